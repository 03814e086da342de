"""dvt_denoise at dataset scale: a killed run resumes to the same outputs; shards together equal one process."""
import errno, json, os, shutil, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch
import fastcore.test as fct
from PIL import Image
from dvt.data import sample_image, resize_images
import dvt.runs
from dvt.runs import RunLock
from dvt.stage1_data import read_stage1, denoise_folder, denoise_folder_cli, list_images
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
def reference_run(images, tmp_path_factory):
    "The uninterrupted run, as a console command with its output going to a pipe (as in a Slurm log): (folder, stdout)."
    out = tmp_path_factory.mktemp("ref")
    r = subprocess.run(cmd(images, out), env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "6 denoised" in r.stdout, r.stdout
    return out, r.stdout


@pytest.fixture(scope="module")
def reference(reference_run):
    return outputs(reference_run[0])


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


# ---------------------------------------------------------------- crash, disk and concurrency safety (issue 14)
@pytest.fixture(scope="module")
def two(images, tmp_path_factory):
    "A two-image folder (astronaut, chelsea) for the tests that start several processes."
    src = tmp_path_factory.mktemp("two")
    for k in ("astronaut", "chelsea"): (src / f"{k}.png").write_bytes((images / f"{k}.png").read_bytes())
    return src


def subset(ref, keys=("astronaut", "chelsea")):
    return {k: ref[k] for k in keys}


def run_inproc(src, out, **kw):
    "The reference run's settings, in this process."
    return denoise_folder(src, out, PlantedBackbone(), preset="smoke", size=64, steps=80, progress=False, **kw)


def leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


def test_progress_lines_when_not_a_terminal(reference_run):
    lines = [l for l in reference_run[1].splitlines() if l.startswith("[dvt_denoise 0/1] ") and "/6 " in l]
    fct.test_eq(len(lines), 6)
    assert lines[0].startswith("[dvt_denoise 0/1] 1/6 astronaut.png done"), lines


def test_truncated_and_empty_outputs_are_recomputed_group_readable(images, reference_run, reference, tmp_path):
    out = tmp_path / "out"; shutil.copytree(reference_run[0], out)
    f = out / "astronaut.safetensors"; f.write_bytes(f.read_bytes()[:200])   # what a power loss can leave
    (out / "coffee.safetensors").write_bytes(b"")
    old = os.umask(0o022)
    try: rep = run_inproc(images, out)
    finally: os.umask(old)
    fct.test_eq(sorted(Path(p).stem for p in rep["done"]), ["astronaut", "coffee"]); fct.test_eq(len(rep["skipped"]), 4)
    assert_same(outputs(out), reference)
    for name in ("astronaut.safetensors", "config.json"): fct.test_eq(oct((out / name).stat().st_mode & 0o777), "0o644")
    fct.test_eq(leftovers(out), [])


def test_resume_with_other_weights_or_dtype_is_refused(images, reference_run, tmp_path):
    out = tmp_path / "out"; shutil.copytree(reference_run[0], out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["weights"]["sha256"].startswith("sha256:") and cfg["stage1"]["extract_dtype"] == "auto"
    other = PlantedBackbone()
    with torch.no_grad(): other.proj.mul_(1.01)                      # other weights, same name and geometry
    fct.test_fail(lambda: denoise_folder(images, out, other, preset="smoke", size=64, steps=80, progress=False),
                  contains="weights.sha256")
    fct.test_fail(lambda: run_inproc(images, out, extract_dtype="bfloat16"), contains="extract_dtype")
    fct.test_eq(json.loads((out / "config.json").read_text()), cfg)  # untouched


def test_claimed_image_is_left_to_its_holder_and_a_killed_claim_does_not_block(images, reference, tmp_path):
    out = tmp_path / "out"; out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; from dvt.runs import RunLock; "
                               f"RunLock({str(out / '.coffee.claim')!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rep = run_inproc(images, out)
        fct.test_eq([Path(p).stem for p in rep["busy"]], ["coffee"]); fct.test_eq(len(rep["done"]), 5)
        assert not (out / "coffee.safetensors").exists()
    finally:
        holder.kill(); holder.wait()
    rep = run_inproc(images, out)                                   # the killed holder's claim file is stale, not held
    fct.test_eq([Path(p).stem for p in rep["done"]], ["coffee"])
    assert_same(outputs(out), reference); fct.test_eq(leftovers(out), [])


def test_two_processes_on_one_folder(two, reference, tmp_path):
    "Same settings: they share the work (no image done twice). Other seeds at once: one of them is refused, never mixed."
    out = tmp_path / "same"
    ps = [subprocess.Popen(cmd(two, out), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    res = [p.communicate(timeout=600) + (p.returncode,) for p in ps]
    assert all(rc == 0 for _, _, rc in res), res
    done = [int(o.split(" denoised")[0].rsplit(" ", 1)[1]) for o, _, _ in res]
    fct.test_eq(sum(done), 2)
    assert_same(outputs(out), subset(reference)); fct.test_eq(leftovers(out), [])
    out = tmp_path / "seeds"
    ps = [subprocess.Popen(cmd(two, out, "--seed", str(k)), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for k in (0, 1)]
    res = [p.communicate(timeout=600) + (p.returncode,) for p in ps]
    fct.test_eq(sorted(rc for _, _, rc in res), [0, 2])
    loser = [e for _, e, rc in res if rc == 2][0]
    assert "different stage-1 run" in loser and "stage1.seed" in loser, loser
    winner_seed = [k for k, (_, _, rc) in zip((0, 1), res) if rc == 0][0]
    fct.test_eq(json.loads((out / "config.json").read_text())["stage1"]["seed"], winner_seed)
    if winner_seed == 0: assert_same(outputs(out), subset(reference))


@pytest.mark.parametrize("point,left", [("write-test", ".write-test-"), ("rename:config.json", ".config.json.tmp-"),
                                        ("rename:chelsea.safetensors", ".chelsea.safetensors.tmp-")])
def test_kill_at_a_write_point_leaves_no_temporaries(two, reference, tmp_path, point, left):
    out = tmp_path / "out"
    r = subprocess.run(cmd(two, out), env=env(DVT_FAULT=point), capture_output=True, text=True, timeout=600)
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
    assert any(n.startswith(left) for n in leftovers(out)), leftovers(out)
    (out / ".tmpAb12_z").write_bytes(b"half")                        # what safetensors.torch.save_file leaves when killed
    run_inproc(two, out)
    fct.test_eq(leftovers(out), [])
    assert_same(outputs(out), subset(reference))


def test_full_disk_fails_by_name_and_stops(images, reference, tmp_path, monkeypatch, capsys):
    real, n = dvt.runs.atomic_write, []
    def full(path, write, **kw):
        if str(path).endswith(".safetensors"):
            n.append(path)
            if len(n) > 2: raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, write, **kw)
    monkeypatch.setattr(dvt.runs, "atomic_write", full)
    with pytest.raises(SystemExit) as e: denoise_folder_cli(cmd(images, tmp_path / "out", "--batch-images", "2")[3:])
    fct.test_eq(e.value.code, 1)
    err = capsys.readouterr().err
    assert "FAILED" in err and "chelsea.png: disk full: could not write" in err and "stopped: disk full" in err, err
    assert "coffee.png: not written: disk full" in err, err          # fitted in the same batch as chelsea
    fct.test_eq(len(list((tmp_path / "out").glob("*.safetensors"))), 2); fct.test_eq(leftovers(tmp_path / "out"), [])
    monkeypatch.setattr(dvt.runs, "atomic_write", real)
    run_inproc(images, tmp_path / "out")
    assert_same(outputs(tmp_path / "out"), reference)


def test_read_only_folder_and_truncated_config_get_messages(images, reference_run, tmp_path, monkeypatch, capsys):
    import builtins
    real = builtins.open
    def ro(path, *a, **k):
        if ".write-test-" in str(path): raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(dvt.runs, "open", ro, raising=False)
    with pytest.raises(SystemExit) as e: denoise_folder_cli(cmd(images, tmp_path / "ro")[3:])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "read-only file system" in err and "choose a writable --out" in err, err
    monkeypatch.setattr(dvt.runs, "open", real, raising=False)
    out = tmp_path / "cut"; shutil.copytree(reference_run[0], out)
    (out / "config.json").write_text((out / "config.json").read_text()[:40])
    with pytest.raises(SystemExit) as e: denoise_folder_cli(cmd(images, out)[3:])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "config.json is not valid JSON (truncated" in err and "--overwrite" in err, err


def test_help_says_what_it_does_and_what_a_rerun_does(capsys):
    with pytest.raises(SystemExit): denoise_folder_cli(["--help"])
    out = capsys.readouterr().out
    assert out.split("\n\n")[1].startswith("Run DVT's stage 1 on a folder"), out[:300]
    assert "Killed and rerun" in out and "Console entry point" not in out
