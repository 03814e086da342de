"""Shared test setup: never touch the network, one torch thread, no progress bars.

One thread: the suite is many small ops, where a second thread costs more than it gives (measured: a stage-1 fit
step 7 ms on one thread vs 232 ms on two on a busy 2-core machine), and the smoke numbers that nbval compares are
bit-reproducible only at a fixed thread count.
"""
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The chapters and the artefact notebooks write figures and tables; under the tests they go to a scratch folder, so
# running the suite never changes tracked files (PNG bytes vary with the torch and matplotlib versions).
import tempfile  # noqa: E402
_scratch = tempfile.mkdtemp(prefix="dvt-test-artefacts-")
os.environ.setdefault("DVT_FIGURES_DIR", os.path.join(_scratch, "figures"))
os.environ.setdefault("DVT_TABLES_DIR", os.path.join(_scratch, "tables"))


# The golden notebooks hold the smoke profile's numbers as the torch and timm of `dvt_reproduce --golden` computed them
# (recorded in each golden's `metadata.dvt`); other versions that settings.ini admits give other last digits (and the
# tables print the versions). There the goldens still run cell by cell, and any error fails, but outputs are not compared.
import json  # noqa: E402
from pathlib import Path  # noqa: E402


def _versions() -> dict:
    import timm
    return {"torch": torch.__version__.split("+")[0], "timm": timm.__version__}


def _golden_versions(path) -> dict | None:
    return json.loads(Path(path).read_text()).get("metadata", {}).get("dvt")


def pytest_collection_modifyitems(config, items):
    made = {}
    for it in items:
        if type(it).__name__ != "IPyNbCell": continue
        v = made.setdefault(str(it.path), _golden_versions(it.path))
        if v is not None and v != _versions(): it.options["check"] = False


def pytest_report_header(config):
    gold = sorted(Path(__file__).parent.glob("golden/*.ipynb"))
    made = {json.dumps(_golden_versions(p), sort_keys=True) for p in gold}
    here = json.dumps(_versions(), sort_keys=True)
    return f"golden outputs made with {', '.join(made)}; here {here}: " + ("compared" if made == {here} else "run, outputs not compared")
