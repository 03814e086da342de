"""Every notebook in nbs/ is a test: execute it top to bottom, as nbdev_test does (its cells hold the assertions)."""
import os
from pathlib import Path
import pytest
import nbdev.test as nbt

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith(("_", ".")))
GOLDEN = {p.name for p in (ROOT / "tests" / "golden").glob("*.ipynb")}  # executed by nbval instead (same cells)


@pytest.mark.parametrize("nb", [p for p in NBS if p.name not in GOLDEN], ids=lambda p: p.name)
def test_notebook_runs(nb):
    os.environ["IN_TEST"] = "1"
    ok, secs = nbt.test_nb(nb, skip_flags=["notest", "slow", "gpu"], basepath=ROOT)
    assert ok, f"{nb.name} failed (see the traceback above)"
