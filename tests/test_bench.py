"""The benchmark harness runs every registered case at tiny sizes on CPU, so it cannot silently break."""
import os
from pathlib import Path
import pytest
import torch
import fastcore.test as fct
from dvt import bench
from dvt.bench import (CASES, COLUMNS, Workload, bench_cli, measure, merge_rows, plan_rows, read_rows, register_case,
                       run_bench, time_fn)


def test_every_case_runs_tiny_with_floor(tmp_path):
    "Every registered (non-opt-in) case, tiny shapes, one repeat: all rows measured with positive timings, floor filled."
    rows = run_bench("tiny", device="cpu", out=tmp_path / "r", floor="on", repeats=1, warmup=0, command="test")
    plan = plan_rows("tiny")
    fct.test_eq(sorted((r["case"], r["config"]) for r in rows), sorted((c.name, bench.config_str(p)) for c, p in plan))
    cases = {c.name for c, _ in plan}
    assert {"backbone", "denoised", "stage1_extract", "stage1_fit", "stage1_image", "srt", "srt_plain"} <= cases, cases
    assert "test_suite" not in cases                                  # opt-in: the suite never times itself
    for r in rows:
        assert r["status"] == "measured", (r["case"], r["note"])
        assert float(r["median_s"]) > 0 and float(r["throughput"]) > 0 and r["repeats"] == 1, r
        fct.test_close(float(r["throughput"]), float(r["items"]) / float(r["median_s"]), eps=1e-9)
        assert r["shape"] and r["unit"].endswith("/s") and r["machine"].startswith("CPU")
        if r["case"] != "stage1_image":                               # end-to-end rows have no floor of their own
            assert float(r["gflop"]) > 0 and float(r["min_mb"]) > 0 and float(r["over_floor"]) > 0, r
    for case, base in (("denoised", "backbone"), ("srt", "srt_plain")):
        r = next(r for r in rows if r["case"] == case)
        assert float(r["ratio"]) > 0 and r["baseline"].startswith(f"{base}: "), r
        assert f"timed in alternation with `{base}`" in r["note"], r["note"]              # row and baseline timed A B A B
    disk = read_rows(tmp_path / "r.csv")
    fct.test_eq(len(disk), len(rows)); fct.test_eq(list(disk[0]), list(COLUMNS))
    md = (tmp_path / "r.md").read_text()
    for name in cases: assert CASES[name].title in md, name
    assert "CPU" in md and torch.__version__ in md


def test_floor_is_left_empty_on_cpu_by_default(tmp_path):
    rows = run_bench("tiny", cases=["backbone"], only="planted", device="cpu", out=tmp_path / "r")
    fct.test_eq(len(rows), 1)
    fct.test_eq((rows[0]["gflop"], rows[0]["floor_s"], rows[0]["over_floor"]), ("", "", ""))
    assert "Floor columns empty" in (tmp_path / "r.md").read_text()


def test_merge_replaces_placeholders_and_same_machine_rows(tmp_path):
    stem = tmp_path / "g"
    bench_cli(["--profile", "tiny", "--case", "backbone", "--dry-run", "--reason", "no GPU", "--out", str(stem)])
    rows = read_rows(stem.with_suffix(".csv"))
    fct.test_eq({r["status"] for r in rows}, {"not measured"}); fct.test_eq(len(rows), len(plan_rows("tiny", ["backbone"])))
    run_bench("tiny", cases=["backbone"], only="planted", device="cpu", out=stem)
    run_bench("tiny", cases=["backbone"], only="planted", device="cpu", out=stem)          # again: replaces, no duplicate
    rows = read_rows(stem.with_suffix(".csv"))
    fct.test_eq(len(rows), len(plan_rows("tiny", ["backbone"])))
    fct.test_eq(sorted(r["status"] for r in rows), ["measured", "not measured"])
    other = dict(rows[0], machine="another machine", status="measured")
    fct.test_eq(len(merge_rows(rows, [other])), len(rows) + (rows[0]["status"] == "measured"))


def test_failed_row_is_recorded_and_the_run_goes_on(tmp_path):
    @register_case("_broken", "a broken case", plans={"tiny": [dict(n=1)]})
    def _broken(device, dtype, n): raise RuntimeError("boom")
    @register_case("_ok", "a trivial case", plans={"tiny": [dict(n=3)]})
    def _ok(device, dtype, n):
        x = torch.rand(n, 8)
        return Workload(lambda: x @ x.T, n, "rows", "(3,8) → (3,3)", inputs=(x,))
    try:
        rows = run_bench("tiny", cases=["_broken", "_ok"], device="cpu", out=tmp_path / "r", floor="on")
        fct.test_eq([r["status"] for r in rows], ["failed", "measured"]); assert "boom" in rows[0]["note"]
        fct.test_eq(float(rows[1]["gflop"]), 2 * 3 * 3 * 8 / 1e9)
        assert "**failed**" in (tmp_path / "r.md").read_text()
        with pytest.raises(SystemExit) as e:                        # the command writes the table, then exits 1
            bench.bench_cli(["--profile", "tiny", "--case", "_broken", "--case", "_ok", "--device", "cpu", "--out", str(tmp_path / "c")])
        fct.test_eq(e.value.code, 1)
        fct.test_eq(len(bench.read_rows(tmp_path / "c.csv")), 2)
        assert bench.bench_cli(["--profile", "tiny", "--case", "_ok", "--device", "cpu", "--out", str(tmp_path / "c")]) is None
    finally: CASES.pop("_broken"); CASES.pop("_ok")


def test_suite_case_refuses_to_recurse(monkeypatch):
    monkeypatch.setenv(bench.SUITE_ENV, "1")
    fct.test_fail(lambda: measure("test_suite", dict(cmd="pytest -q"), "cpu"), contains="inside a test suite")
    fct.test_eq([c.name for c, _ in plan_rows("cpu", ["test_suite"])], ["test_suite"])


def test_bad_arguments_name_the_fix(tmp_path):
    fct.test_fail(lambda: plan_rows("huge"), contains="tiny")
    fct.test_fail(lambda: plan_rows("tiny", ["nope"]), contains="registered")
    fct.test_fail(lambda: run_bench("tiny", dtype="int8", out=tmp_path / "x"), contains="float32")
    fct.test_fail(lambda: time_fn(lambda: None, warmup=-1), contains="warmup")
    if not torch.cuda.is_available():
        fct.test_fail(lambda: run_bench("tiny", device="cuda", out=tmp_path / "x"), contains="not available")


def test_profiles_plan_the_issue_rows():
    "The gpu profile holds the issue's targets: paper preset on DINOv2-B at 518, denoised vs raw, SRT 49 shifts (when present)."
    gpu = [f"{c.name}: {bench.config_str(p)}" for c, p in plan_rows("gpu")]
    assert any("stage1_image" in r and "preset=paper" in r and "vit_base" in r and "size=518" in r for r in gpu), gpu
    assert any(r.startswith("denoised") and "vit_base" in r and "size=518" in r for r in gpu)
    assert any(r.startswith("srt:") and "radius=3" in r and "vit_base" in r for r in gpu)    # 49 shifts
    assert any(r.startswith("srt_plain:") and "radius=3" in r and "vit_base" in r for r in gpu)
    for c in CASES.values(): assert c.opt_in or all(c.plans.get(p) for p in ("tiny", "cpu", "gpu")), c.name
