"""The nbval goldens must be papermill runs of the CURRENT notebooks: same code cells, smoke profile."""
import json
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = sorted((ROOT / "tests" / "golden").glob("*.ipynb"))


def _code(nb_path):
    nb = json.loads(nb_path.read_text())
    return [c["source"] if isinstance(c["source"], str) else "".join(c["source"]) for c in nb["cells"]
            if c["cell_type"] == "code" and "injected-parameters" not in c.get("metadata", {}).get("tags", [])]


@pytest.mark.parametrize("golden", GOLDEN, ids=lambda p: p.name)
def test_golden_is_current(golden):
    src = ROOT / "nbs" / golden.name
    assert src.exists(), f"{golden.name} has no source notebook in nbs/"
    assert _code(golden) == _code(src), (f"tests/golden/{golden.name} is stale: regenerate it with "
                                         "`dvt_reproduce --golden --notebook " + golden.name + "`")
    nb = json.loads(golden.read_text())
    injected = [c for c in nb["cells"] if "injected-parameters" in c.get("metadata", {}).get("tags", [])]
    assert all("smoke" in "".join(c["source"]) for c in injected), "goldens are smoke-profile runs"
