"""Offline, a pretrained model fails in seconds (not after a minute of hub retries) and names the fix for where it
was asked for: Python arguments, a command's flags, or `dvt_reproduce -p checkpoints ...` inside its notebooks."""
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "vit_small_patch14_dinov2.lvd142m"
SCRIPT = r"""
import json, os, sys, time
import dvt.backbones as b
from dvt.core import REPRODUCE_WEIGHTS_FIX
from dvt.stage1_data import denoise_folder_cli
name, tmp, out = sys.argv[1], sys.argv[2], {}
t = time.perf_counter()
try: b.Backbone(name)
except b.WeightsUnavailable as e: out["python"] = [time.perf_counter() - t, str(e)]
t = time.perf_counter()
try: denoise_folder_cli([tmp, "--out", os.path.join(tmp, "out"), "--model", name])
except SystemExit as e: out["cli"] = [time.perf_counter() - t, str(e.code)]
os.environ["DVT_WEIGHTS_FIX"] = REPRODUCE_WEIGHTS_FIX        # what dvt_reproduce gives its notebooks' kernels
try: b.create_vit(name)
except b.WeightsUnavailable as e: out["reproduce"] = [0.0, str(e)]
print(json.dumps(out))
"""


def test_pretrained_offline_fails_fast_and_names_the_fix(tmp_path):
    "The hub unreachable (a port nothing listens on); `HF_HUB_OFFLINE=1` is covered in 01_backbones."
    e = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "DVT_WEIGHTS_FIX")}
    e.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hub"), PYTHONPATH=str(ROOT))   # an empty cache: nothing to fall back on
    r = subprocess.run([sys.executable, "-c", SCRIPT, NAME, str(tmp_path)], env=e, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out) == {"python", "cli", "reproduce"}, out
    for where in ("python", "cli"): assert out[where][0] < 8, f"{where}: {out[where][0]:.1f}s to fail offline"
    assert "pretrained=False" in out["python"][1] and f"checkpoint='path/to/{NAME}.safetensors'" in out["python"][1]
    assert out["cli"][1].startswith("dvt_denoise: error:") and "--random-init" in out["cli"][1] and "--checkpoint" in out["cli"][1]
    assert "pretrained=False" not in out["cli"][1]
    assert f"""-p checkpoints '{{"{NAME}": "path/to/{NAME}.safetensors"}}'""" in out["reproduce"][1], out["reproduce"][1]
