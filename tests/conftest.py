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
