"""dvt.evaljobs: the plan, result files that are never mixed, locks, missing inputs, a killed job that resumes, a rehearsal slice."""
import json, os, random, subprocess, sys, time
from pathlib import Path
import pytest
import torch
from dvt.evaljobs import (Job, JobEnv, JobBusy, MissingInputs, plan, shard, format_plan, estimate_gpu_hours, run_job, job_state,
                          read_result, status, _file_lock, submit)

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import sys; from dvt.evaljobs import eval_cli; sys.exit(eval_cli())"]   # as the console script calls it


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([*CLI, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_full_plan_lists_every_job_with_estimates():
    jobs = plan("full")
    assert len(jobs) >= 100 and len({j.name for j in jobs}) == len(jobs)
    assert {j.task for j in jobs} == {"train", "distill", "mic", "voc", "ade", "nyu", "davis", "lost", "hb_voc", "hb_ade", "oc_voc", "oc_ade"}
    hours = [estimate_gpu_hours(j) for j in jobs]
    assert all(h > 0 for h in hours)
    srt, base = (estimate_gpu_hours(Job("vit_base_patch14_dinov2.lvd142m", v, "nyu")) for v in ("srt", "baseline"))
    assert srt > 40 * base                                       # 49 shifts per forward
    text = format_plan(jobs, check=False)
    assert text.count("dvt_eval run ") == len(jobs) and f"total for {len(jobs)} jobs" in text and "estimate" in text
    parts = [shard(jobs, f"{i}/4") for i in range(4)]
    assert sorted(j.name for p in parts for j in p) == sorted(j.name for j in jobs)
    with pytest.raises(ValueError, match="i/n"): shard(jobs, "4")


def test_missing_inputs_are_named_before_compute(tmp_path):
    env = JobEnv(results=tmp_path, data_root=tmp_path / "empty")
    with pytest.raises(MissingInputs) as e:
        run_job("vit_base_patch14_dinov2.lvd142m", "voc_denoised", "voc", "full", env)
    msg = str(e.value)
    assert "huggingface-cli download jjiaweiyang/DVT voc_denoised/vit_base_patch14_dinov2.lvd142m.pth" in msg
    assert "data/README.md" in msg and "VOCdevkit/VOC2012" in msg
    with pytest.raises(MissingInputs, match="run the train job first"):
        run_job("planted", "ours", "voc", "smoke", JobEnv(results=tmp_path))
    assert not list(tmp_path.glob("full/**/*.json"))              # nothing computed, nothing written


def test_done_skipped_unparsable_recomputed_changed_data_not_mixed(tmp_path):
    env = JobEnv(results=tmp_path, device="cpu")
    job = Job("planted", "baseline", "lost", "smoke")
    r = run_job(*job.__dict__.values(), env=env)
    path = job.result_path(tmp_path)
    assert read_result(path)["fingerprint"] == r["fingerprint"] and job_state(job, env)[0] == "done"
    assert run_job(*job.__dict__.values(), env=env)["finished"] == r["finished"]           # done: skipped
    path.write_text('{"metrics": {"CorLoc": 1')                                              # torn write
    assert job_state(job, env)[0] == "missing"
    r2 = run_job(*job.__dict__.values(), env=env)
    assert r2["metrics"] == r["metrics"] and r2["fingerprint"] == r["fingerprint"]
    split = tmp_path / "smoke/_inputs/data/VOCdevkit/VOC2012/ImageSets/Main/trainval.txt"
    split.write_text("\n".join(split.read_text().split()[:4]) + "\n")                         # the dataset changed
    assert job_state(job, env)[0] == "stale"
    r3 = run_job(*job.__dict__.values(), env=env)
    assert r3["fingerprint"] != r["fingerprint"] and r3["counts"]["images"] == 4
    assert list(path.parent.glob(f"{path.stem}.stale-{r['fingerprint'][:12]}.json"))        # the old one set aside


def test_one_copy_per_job(tmp_path):
    env = JobEnv(results=tmp_path, device="cpu")
    job = Job("planted", "baseline", "lost", "smoke")
    with _file_lock(job.result_path(tmp_path).with_suffix(".lock")):
        assert job_state(job, env)[0] == "running"
        with pytest.raises(JobBusy): run_job(*job.__dict__.values(), env=env)
    assert not job.result_path(tmp_path).exists()


def test_killed_job_resumes_to_the_same_result(tmp_path):
    "A training job (stage 1 + stage 2, checkpointed) killed at a random moment, rerun: the same result as an uninterrupted run."
    import numpy as np
    from PIL import Image
    data = tmp_path / "data"; data.mkdir()                        # a training list of two photos, nothing else to write
    for i in range(2): Image.fromarray(np.random.default_rng(i).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(data / f"p{i}.png")
    (data / "voc_train.txt").write_text("p0.png\np1.png\n")
    args = ["run", "--profile", "smoke", "--task", "train", "--model", "planted", "--variant", "ours", "--device", "cpu",
            "--threads", "1", "--data-root", str(data)]
    t0 = time.time(); p = _cli(*args, "--results", str(tmp_path / "a")); out = p.communicate()[0]; full = time.time() - t0
    assert p.returncode == 0, out
    moment = random.Random().uniform(0.3, 0.9) * full
    p = _cli(*args, "--results", str(tmp_path / "b")); time.sleep(moment); p.kill(); p.communicate()
    print(f"killed after {moment:.1f} s of {full:.1f} s (return code {p.returncode})")
    p = _cli(*args, "--results", str(tmp_path / "b")); out = p.communicate()[0]
    assert p.returncode == 0, out
    a, b = (json.loads((tmp_path / x / "smoke/train/planted__ours.json").read_text()) for x in "ab")
    for r in (a, b): r.pop("wall_s"); r.pop("finished"); r.pop("timing")      # wall times
    assert a == b


def test_rehearsal_slice_real_sizes_official_format(tmp_path):
    "The rehearsal route for one cell: real-size VOC, random ViT-S weights from a local file, a released-format denoiser."
    env = JobEnv(results=tmp_path, device="cpu")
    r = run_job("vit_small_patch14_dinov2.lvd142m", "voc_denoised", "lost", "rehearsal", env)
    assert r["inputs"]["weights:vit_small_patch14_dinov2.lvd142m"]["kind"] == "file"
    assert r["inputs"]["denoiser:vit_small_patch14_dinov2.lvd142m"]["file"].endswith(".pth")
    from PIL import Image
    jpg = next((tmp_path / "rehearsal/_inputs/data/VOCdevkit/VOC2012/JPEGImages").glob("*.jpg"))
    assert Image.open(jpg).size == (500, 375) and r["counts"]["images"] == 4 and 0 <= r["metrics"]["CorLoc"] <= 100


def test_submit_builds_arrays(tmp_path):
    submitit = pytest.importorskip("submitit")
    env = JobEnv(results=tmp_path, device="cpu")
    sel = dict(models=["planted"], tasks=["lost"], variants=["baseline", "srt"])
    jobs = submit("smoke", env, shards=2, folder=tmp_path / "slurm", executor="debug", **sel)
    assert len(jobs) == 2                                          # one array of 2 shards (no training job selected)
    for j in jobs: j.result()
    st = status(plan("smoke", **sel), env)
    assert {s for s in st} == {"done"}, st


def test_table_files_load_plainly(tmp_path):
    "Issue 11: the CSVs load with pandas.read_csv without options; the sidecar names each cell's result and state."
    pd = pytest.importorskip("pandas")
    from dvt.evaljobs import collect, result_rows, protocol_note, write_result_table
    env = JobEnv(results=tmp_path / "r", device="cpu")
    cells = collect(plan("smoke", ["planted"], ["lost"]), env, compute=False)          # nothing computed: all pending
    rows = result_rows(cells, {"CorLoc": "CorLoc"})
    md = write_result_table(rows, "t", "LOST", "smoke", protocol_note(cells), cells, folder=tmp_path)
    df = pd.read_csv(tmp_path / "t.csv")
    assert list(df.columns) == ["model", "variant", "CorLoc", "status"] and len(df) == 3 and df["status"].str.startswith("pending").all()
    side = json.loads((tmp_path / "t.json").read_text())
    assert [c["state"] for c in side["cells"]] == ["missing", "blocked", "missing"] and "random" in side["label"] and "random" in md


def test_help_says_what_a_kill_and_a_rerun_do(capsys):
    import pytest
    from dvt.evaljobs import eval_cli
    with pytest.raises(SystemExit): eval_cli(["--help"])
    out = capsys.readouterr().out
    assert "Killed and rerun" in out and "resumes from its last checkpoint" in out


def test_console_script_exit_status(tmp_path):
    "The installed `dvt_eval` runs `sys.exit(eval_cli())`: plan and status exit 0 with nothing on stderr."
    for cmd in ("plan", "status"):
        p = subprocess.run([*CLI, cmd, "--profile", "rehearsal", "--models", "vit_small_patch14_dinov2.lvd142m", "--tasks", "mic",
                            "--results", str(tmp_path), *(["--no-check"] if cmd == "plan" else [])],
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 0 and p.stderr == "", (cmd, p.returncode, p.stderr[-500:])
        assert "mic/vit_small_patch14_dinov2.lvd142m" in p.stdout or "dvt_eval run" in p.stdout


def test_dino_models_use_dinos_position_embeddings_on_davis():
    from dvt.evaljobs import Job, dino_protocol, make_extractor
    assert dino_protocol(Job("vit_base_patch16_224.dino", "baseline", "davis", "full"))
    assert not dino_protocol(Job("vit_base_patch16_224.dino", "baseline", "voc", "full"))
    assert not dino_protocol(Job("vit_base_patch14_dinov2.lvd142m", "baseline", "davis", "full"))
    m = make_extractor("vit_small_patch16_224.dino", pretrained=False, dino_pos_embed=True)
    assert m.model._pos_embed.__func__.__name__ == "_dino_pos_embed"


def test_training_free_and_srt_baseline_jobs(tmp_path):
    "Issue 16 item 4 and issue 15 item 10: retrieval / overclustering tasks and SRT's released baselines are grid cells."
    env = JobEnv(results=tmp_path, device="cpu")
    r = run_job("planted", "baseline", "hb_voc", "smoke", env)
    path = Job("planted", "baseline", "hb_voc", "smoke").result_path(tmp_path)
    assert read_result(path)["fingerprint"] == r["fingerprint"] and 0 <= r["metrics"]["mIoU"] <= 100
    assert r["protocol"]["retrieval"]["memory_size"] == 200 and 0 < r["counts"]["memory"] <= 200 and "k-NN" in r["summary"]["head"]
    assert run_job("planted", "baseline", "hb_voc", "smoke", env)["finished"] == r["finished"]          # done: skipped
    o = run_job("planted", "baseline", "oc_ade", "smoke", env)
    assert "overclustering" in o["summary"]["head"] and o["counts"]["patches"] >= o["protocol"]["retrieval"]["n_clusters"]
    e = run_job("planted", "srt_output", "nyu", "smoke", env)
    assert set(e["single_view"]) == set(e["metrics"]) == {"rmse", "abs_rel", "d1"} and "kind=output radius=1" in e["summary"]["srt_baseline"]
    n = run_job("planted", "srt_noise", "nyu", "smoke", env)
    assert "n=9" in n["summary"]["srt_baseline"] and n["metrics"]["rmse"] > 0
    assert job_state(Job("planted", "srt_noise", "nyu", "smoke"), env)[0] == "done"
    with pytest.raises(ValueError, match="task 'nyu' only"): Job("planted", "srt_output", "voc", "smoke")
    a = run_job("planted", "rasa", "oc_voc", "smoke", env)                                  # fitted when the job starts
    assert a["inputs"]["data:train list"]["images"] == 2 and "regression" in a["summary"]["rasa"]


def test_training_free_and_srt_baselines_in_the_plan(tmp_path):
    full = plan("full", models=["vit_base_patch14_dinov2.lvd142m"])
    names = {j.name for j in full}
    assert {f"{t}/vit_base_patch14_dinov2.lvd142m__baseline" for t in ("hb_voc", "hb_ade", "oc_voc", "oc_ade")} <= names
    assert {f"nyu/vit_base_patch14_dinov2.lvd142m__{v}" for v in ("srt_noise", "srt_bicubic", "srt_output")} <= names
    h = {v: estimate_gpu_hours(Job("vit_base_patch14_dinov2.lvd142m", v, "nyu")) for v in ("baseline", "srt_noise", "srt_bicubic", "srt_output")}
    assert h["srt_noise"] > 40 * h["baseline"] and h["baseline"] < h["srt_output"] < h["srt_noise"] and h["srt_bicubic"] == h["baseline"]
    assert all(estimate_gpu_hours(j) > 0 for j in full if j.task[:3] in ("hb_", "oc_"))
    smoke = {j.name for j in plan("smoke")}
    assert "nyu/planted__srt_noise" in smoke and "nyu/vit_small_patch14_dinov2.lvd142m__srt_output" not in smoke   # the budget
    env = JobEnv(results=tmp_path, data_root=tmp_path / "empty")
    with pytest.raises(MissingInputs) as e: run_job("vit_base_patch14_dinov2.lvd142m", "baseline", "hb_ade", "full", env)
    assert "ADEChallengeData2016" in str(e.value) and "data/README.md" in str(e.value)
    with pytest.raises(MissingInputs, match="nyu"): run_job("vit_base_patch14_dinov2.lvd142m", "srt_noise", "nyu", "full", env)
    with pytest.raises(MissingInputs, match="voc_train.txt"): run_job("vit_base_patch14_dinov2.lvd142m", "rasa", "hb_voc", "full", env)


def test_cpu_profile_results_are_per_torch_and_timm(tmp_path, monkeypatch):
    "A smoke / rehearsal result made with another torch or timm is recomputed (their last digits differ); full results are not."
    import dvt.evaljobs as ej
    env = JobEnv(results=tmp_path, device="cpu")
    card = lambda job: ej.protocol_card(job, env, [])["fingerprint"]
    smoke, full = Job("planted", "baseline", "mic", "smoke"), Job("vit_small_patch14_dinov2.lvd142m", "baseline", "mic", "full")
    before = card(smoke), card(full)
    monkeypatch.setattr(ej, "_versions", lambda: {"torch": "2.4.0", "timm": "1.0.15"})
    assert card(smoke) != before[0] and card(full) == before[1]
