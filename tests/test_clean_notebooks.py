"""The notebooks in nbs/ are source: no outputs or execution counts are committed (a JupyterLab autosave adds them;
`jupyter nbconvert --clear-output --inplace nbs/*.ipynb && nbdev_clean` removes them and keeps papermill's tags)."""
import json
from pathlib import Path
import pytest

NBS = sorted((Path(__file__).resolve().parents[1] / "nbs").glob("*.ipynb"))


@pytest.mark.parametrize("nb", NBS, ids=lambda p: p.name)
def test_notebook_has_no_outputs(nb):
    cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
    dirty = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{nb.name}: code cells {dirty[:10]} hold outputs or execution counts; run "
                       f"`jupyter nbconvert --clear-output --inplace nbs/{nb.name} && nbdev_clean` before committing.")
