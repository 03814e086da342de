"""dvt_denoise at dataset scale: a killed run resumes to the same outputs; shards together equal one process."""
import os, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch
import fastcore.test as fct
from PIL import Image
from dvt.data import sample_image, resize_images
from dvt.stage1_data import read_stage1, denoise_folder, list_images
from dvt.synthetic import PlantedBackbone

NAMES = ("astronaut", "coffee", "chelsea", "rocket", "retina", "camera")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    src = tmp_path_factory.mktemp("images")
    for k in NAMES:
        x = resize_images(sample_image(k), 80)
        Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()).save(src / f"{k}.png")
    return src


def cmd(src, out, *extra):
    return [sys.executable, "-m", "dvt.stage1_data", str(src), "--out", str(out), "--model", "planted", "--preset", "smoke",
            "--size", "64", "--threads", "1", "--set", "steps=80", *extra]


def env(**kw):
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**e, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", **kw}


def outputs(folder):
    return {p.stem: read_stage1(p) for p in sorted(Path(folder).glob("*.safetensors"))}


def assert_same(a, b):
    fct.test_eq(sorted(a), sorted(b))
    for k in a:
        assert torch.equal(a[k]["raw"], b[k]["raw"]) and torch.equal(a[k]["clean"], b[k]["clean"]), k


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    r = subprocess.run(cmd(images, out), env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "6 denoised" in r.stdout, r.stdout
    return outputs(out)


def test_kill_and_resume(images, reference, tmp_path):
    out = tmp_path / "killed"
    p = subprocess.Popen(cmd(images, out), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not list(out.glob("*.safetensors")) and time.time() - t0 < 300 and p.poll() is None: time.sleep(0.02)
    p.send_signal(signal.SIGKILL); p.wait()
    done = list(out.glob("*.safetensors"))
    assert 1 <= len(done) < len(NAMES), f"the kill came too late or too early: {len(done)} outputs"
    for f in done: read_stage1(f)                                   # every file under a final name is complete
    r = subprocess.run(cmd(images, out), env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"{len(done)} already done" in r.stdout, r.stdout
    assert not [f for f in out.iterdir() if ".tmp" in f.name]           # the killed run's temporary files are gone
    assert_same(outputs(out), reference)


def test_two_shards_equal_one_process(images, reference, tmp_path):
    out = tmp_path / "sharded"
    r0 = subprocess.run(cmd(images, out), env=env(RANK="0", WORLD_SIZE="2"), capture_output=True, text=True, timeout=600)
    r1 = subprocess.run(cmd(images, out, "--shard", "1/2"), env=env(), capture_output=True, text=True, timeout=600)
    assert r0.returncode == 0 and r1.returncode == 0, (r0.stderr, r1.stderr)
    assert "[dvt_denoise 0/2] 3 denoised" in r0.stdout and "[dvt_denoise 1/2] 3 denoised" in r1.stdout, (r0.stdout, r1.stdout)
    assert_same(outputs(out), reference)


def test_failures_reported_at_the_end(images, tmp_path):
    src = tmp_path / "src"; src.mkdir()
    for k in ("astronaut", "coffee"): (src / f"{k}.png").write_bytes((images / f"{k}.png").read_bytes())
    (src / "aaa_broken.png").write_bytes(b"\x89PNG garbage")
    Image.new("RGB", (3, 3)).save(src / "tiny.png")                 # smaller than the 4x4 token grid
    r = subprocess.run(cmd(src, tmp_path / "out"), env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 1
    assert "2 denoised" in r.stdout and "2 failed" in r.stdout, r.stdout
    assert "FAILED" in r.stderr and "aaa_broken.png" in r.stderr and "smaller than the 4x4 token grid" in r.stderr, r.stderr
    fct.test_eq(sorted(p.stem for p in (tmp_path / "out").glob("*.safetensors")), ["astronaut", "coffee"])


def test_bad_inputs(images, tmp_path):
    bb = PlantedBackbone(input_size=64)
    (tmp_path / "file").write_text("")
    fct.test_fail(lambda: denoise_folder(images, tmp_path / "file" / "out", bb, preset="smoke"), contains="cannot write")
    fct.test_fail(lambda: denoise_folder(images, tmp_path / "o", bb, preset="smoke", n_views=0), contains="n_views >= 1")
    fct.test_fail(lambda: denoise_folder(images, tmp_path / "o", bb, preset="fastest"), contains="unknown preset")
    fct.test_fail(lambda: denoise_folder(images, tmp_path / "o", bb, shard="3/2"), contains="0 <= i < n")
    dup = tmp_path / "dup"; (dup / "a").mkdir(parents=True); (dup / "b").mkdir()
    for d in ("a", "b"): Image.new("RGB", (64, 64)).save(dup / d / "x.png")
    fct.test_fail(lambda: list_images(dup), contains="share the stem 'x'")
    lst = tmp_path / "list.txt"; lst.write_text(f"# two images\n{images / 'coffee.png'}\n\nimages_missing/rocket.png\n")
    fct.test_eq([p.name for p in list_images(lst)], ["coffee.png", "rocket.png"])
    r = subprocess.run(cmd(images, tmp_path / "o2", "--set", "n_views=0"), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "n_views >= 1" in r.stderr


def test_console_script_exits_0_and_batches(images, reference, tmp_path):
    "As installed (`sys.exit(denoise_folder_cli())`): exit 0 on success; `--batch-images 4` writes the one-at-a-time pairs."
    script = "import sys; from dvt.stage1_data import denoise_folder_cli; sys.exit(denoise_folder_cli())"
    r = subprocess.run([sys.executable, "-c", script, *cmd(images, tmp_path / "out", "--batch-images", "4")[3:]], env=env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout, r.stderr)
    got = outputs(tmp_path / "out")
    fct.test_eq(sorted(got), sorted(reference))
    for k in got:
        assert torch.equal(got[k]["raw"], reference[k]["raw"]), k
        torch.testing.assert_close(got[k]["clean"], reference[k]["clean"], rtol=1e-4, atol=1e-5)
