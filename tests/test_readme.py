"""The README's promises: its two commands, and its "Using it" snippet running as written on a machine without
weights or network (random weights first; the pretrained line fails in seconds and prints the fix)."""
import os, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_commands():
    for cmd in ('pip install -e ".[dev]" && dvt_reproduce', 'pip install -e ".[dev]" && pytest'):
        assert f"```bash\n{cmd}\n```" in README, f"the README lost its command {cmd!r}"


def test_using_it_snippet_runs_offline(tmp_path):
    part = README.split("## Using it", 1)[1]
    code = re.search(r"```python\n(.*?)```", part, re.S).group(1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code + "\nprint('shape', tuple(tokens.shape), tuple(rgb.shape))"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "shape (1, 37, 37, 384) (37, 37, 3)" in r.stdout, r.stdout
    assert "no pretrained weights for 'vit_small_patch14_dinov2.lvd142m'" in r.stdout and "pretrained=False" in r.stdout, r.stdout
