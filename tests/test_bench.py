"""The benchmark harness runs every stage case at tiny sizes on CPU (the GPU profile's code path), so it cannot silently break."""
from dataclasses import dataclass, fields
import pytest
import torch
import fastcore.test as fct
import dvt.stage1
from dvt import bench
from dvt.bench import (COLUMNS, NotAvailable, Workload, bench_case, bench_cli, load_cases, measure, merge_rows, plan_rows,
                       read_rows, run_bench, time_fn)
from dvt.bench_cases import SUITE_ENV, stage1_settings


@bench_case("_broken", "a broken case", plans={"tiny": [dict(n=1)]})
def broken_case(device, dtype, n): raise RuntimeError("boom")

@bench_case("_ok", "a trivial case", plans={"tiny": [dict(n=3)]})
def ok_case(device, dtype, n):
    x = torch.rand(n, 8, generator=torch.Generator().manual_seed(0))
    return Workload(lambda: x @ x.T, n, "rows", "(3,8) → (3,3)", inputs=(x,))

@bench_case("_slow", "a case that never ends", plans={"tiny": [dict(n=1)]})
def slow_case(device, dtype, n):
    while True: pass

def extra_cases():
    "A case source, as another module would provide one (`dvt_bench --cases-from test_bench:extra_cases`)."
    return [broken_case, ok_case]


def test_every_case_runs_tiny_with_floor(tmp_path):
    "Every stage case (not opt-in), tiny shapes, one repeat: rows measured with positive timings and the floor filled."
    rows = run_bench("tiny", device="cpu", out=tmp_path / "r", floor="on", repeats=1, warmup=0, command="test")
    plan = plan_rows("tiny")
    fct.test_eq(sorted((r["case"], r["config"]) for r in rows), sorted((c.name, bench.config_str(p)) for c, p in plan))
    cases = {c.name for c, _ in plan}
    assert {"backbone", "denoised", "stage1_extract", "stage1_fit", "stage1_image", "srt", "srt_plain"} <= cases, cases
    assert "test_suite" not in cases                                  # opt-in: the suite never times itself
    for r in rows:
        if r["status"] == "not available":                           # CUDA graphs on a CPU: the reason, no numbers
            assert "compile=graph" in r["config"] and "CUDA" in r["note"] and r["median_s"] == "", r
            continue
        assert r["status"] == "measured", (r["case"], r["note"])
        assert float(r["median_s"]) > 0 and float(r["throughput"]) > 0 and r["repeats"] == 1, r
        fct.test_close(float(r["throughput"]), float(r["items"]) / float(r["median_s"]), eps=1e-9)
        assert r["shape"] and r["unit"].endswith("/s") and r["machine"].startswith("CPU")
        if r["case"] != "stage1_image":                               # end-to-end rows have no floor of their own
            assert float(r["gflop"]) > 0 and float(r["min_mb"]) > 0 and float(r["over_floor"]) > 0, r
    for case, base in (("denoised", "backbone"), ("srt", "srt_plain")):
        r = next(r for r in rows if r["case"] == case)
        assert float(r["ratio"]) > 0 and r["baseline"].startswith(f"{base}: ") and r["goal"].startswith("≥ 0.9"), r
        assert f"timed in alternation with `{base}`" in r["note"], r["note"]              # row and baseline timed A B A B
    fit = [r for r in rows if r["case"] == "stage1_fit" and r["status"] == "measured"]
    assert fit and all(float(r["extrap_s_per_image"]) > 0 and "extrapolated" in r["note"] for r in fit), fit
    k2 = next(r for r in fit if "images=2" in r["config"])
    assert k2["baseline"] == "stage1_fit: compile=off dim=64 grid=4 images=1 preset=smoke steps=4 views=2" and float(k2["ratio"]) > 0
    disk = read_rows(tmp_path / "r.csv")
    fct.test_eq(len(disk), len(rows)); fct.test_eq(list(disk[0]), list(COLUMNS))
    md = (tmp_path / "r.md").read_text()
    for c, _ in plan: assert c.title in md, c.name
    assert "CPU" in md and torch.__version__ in md and "**not available**" in md
    assert "## Stage 1 per image, full recipe (derived)" in md                 # measured extraction + extrapolated fit


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
    bench_cli(["--profile", "tiny", "--case", "backbone", "--dry-run", "--out", str(stem)])  # placeholders never erase results
    fct.test_eq(sorted(r["status"] for r in read_rows(stem.with_suffix(".csv"))), ["measured", "not measured"])


def test_failed_row_is_recorded_and_the_run_goes_on(tmp_path):
    rows = run_bench("tiny", cases=[broken_case, ok_case], device="cpu", out=tmp_path / "r", floor="on")
    fct.test_eq([r["status"] for r in rows], ["failed", "measured"]); assert "boom" in rows[0]["note"]
    fct.test_eq(float(rows[1]["gflop"]), 2 * 3 * 3 * 8 / 1e9)
    assert "**failed**" in (tmp_path / "r.md").read_text()
    src = f"{__name__}:extra_cases"                                   # the case-list hook: another module's cases
    with pytest.raises(SystemExit) as e:                              # the command writes the table, then exits 1
        bench_cli(["--profile", "tiny", "--cases-from", src, "--case", "_broken", "--device", "cpu", "--out", str(tmp_path / "c")])
    fct.test_eq(e.value.code, 1)
    fct.test_eq(len(read_rows(tmp_path / "c.csv")), 2)               # --case plus the source's cases
    assert bench_cli(["--profile", "tiny", "--cases-from", src, "--case", "_ok", "--only", "_ok", "--device", "cpu",
                      "--out", str(tmp_path / "d")]) is None


def test_budgets_bound_the_run(tmp_path):
    "A row past its time limit is stopped and recorded as failed, the next one runs; rows past the run's budget are not measured."
    rows = run_bench("tiny", cases=[slow_case, ok_case], device="cpu", out=tmp_path / "r", row_budget=0.3)
    fct.test_eq([r["status"] for r in rows], ["failed", "measured"])
    assert "BudgetExceeded" in rows[0]["note"] and "0.3 s" in rows[0]["note"], rows[0]["note"]
    rows = run_bench("tiny", cases=[ok_case], device="cpu", out=tmp_path / "s", budget=1e-6)
    fct.test_eq(rows[0]["status"], "not measured"); assert "budget" in rows[0]["note"]


def test_compile_mode_is_passed_through_or_not_available(monkeypatch):
    "The stage-1 rows hand their `compile` mode to stage 1's config, and say 'not available' where it has no such option."
    real = dvt.stage1.Stage1Config
    with_opt = dataclass(type("Cfg", (real,), {"__annotations__": {"compile": str}, "compile": "off"}))
    seen = {}
    monkeypatch.setattr(dvt.stage1, "Stage1Config", with_opt)
    monkeypatch.setattr(dvt.stage1, "stage1_config", lambda preset, **kw: seen.update(kw) or with_opt(**kw))
    fct.test_eq(stage1_settings("paper", "on", "cpu", steps=5).compile, "on"); fct.test_eq(seen, dict(compile="on", steps=5))
    fct.test_fail(lambda: stage1_settings("paper", "graph", "cpu"), contains="needs a CUDA device")
    without = dataclass(type("Cfg", (), {"__annotations__": {"steps": int}, "steps": 1}))
    monkeypatch.setattr(dvt.stage1, "Stage1Config", without)
    with pytest.raises(NotAvailable, match="no `compile` option"): stage1_settings("paper", "on", "cpu")
    fct.test_eq(stage1_settings("paper", "off", "cpu", steps=3).steps, 3)          # eager needs no option


def test_fit_rows_call_fit_stack_and_refuse_a_silent_eager_fallback(monkeypatch):
    "A fit row runs stage 1's `fit_stack` on its first call (the compilation) and fails when stage 1 warns it fitted eagerly instead."
    import warnings
    from dvt.bench_cases import stage1_fit_case
    calls = []
    def fake(stack, y, coords, hw, cfg, seeds):
        calls.append((tuple(y.shape), list(seeds))); warnings.warn("stage 1: compile='on' failed (boom); fitting eagerly.")
    monkeypatch.setattr(dvt.stage1, "fit_stack", fake)
    fct.test_fail(lambda: stage1_fit_case("cpu", "float32", preset="smoke", dim=8, grid=3, views=2, steps=2, images=2),
                  contains="did not run as asked")
    fct.test_eq(calls, [((2, 2 * 9, 8), [1, 2])])


def test_suite_case_refuses_to_recurse(monkeypatch):
    monkeypatch.setenv(SUITE_ENV, "1")
    fct.test_fail(lambda: measure("test_suite", dict(cmd="pytest -q"), "cpu"), contains="inside a test suite")
    fct.test_eq([c.name for c, _ in plan_rows("cpu", ["test_suite"])], ["test_suite"])


def test_bad_arguments_name_the_fix(tmp_path):
    fct.test_fail(lambda: plan_rows("huge"), contains="tiny")
    fct.test_fail(lambda: plan_rows("tiny", ["nope"]), contains="case sources hold")
    fct.test_fail(lambda: run_bench("tiny", dtype="int8", out=tmp_path / "x"), contains="float32")
    fct.test_fail(lambda: run_bench("tiny", budget=-1, out=tmp_path / "x"), contains="positive number of seconds")
    fct.test_fail(lambda: run_bench("tiny", colour="red", out=tmp_path / "x"), contains="unknown run setting")
    fct.test_fail(lambda: load_cases(["dvt.bench_cases"]), contains="module:function")
    fct.test_fail(lambda: time_fn(lambda: None, warmup=-1), contains="warmup")
    if not torch.cuda.is_available():
        fct.test_fail(lambda: run_bench("tiny", device="cuda", out=tmp_path / "x"), contains="not available")
        fct.test_fail(lambda: run_bench("gpu", out=tmp_path / "x"), contains="dry_run=True")     # GPU-sized rows, no GPU


def test_profiles_plan_the_issue_rows():
    "The gpu profile holds the issue's rows: DINOv2-B at 518, denoised vs raw at B = 64, SRT 49 shifts, the stage-1 fit per mode and K."
    gpu = [c.key(p) for c, p in plan_rows("gpu")]
    assert any(r.startswith("denoised:") and "batch=64" in r and "vit_base" in r and "size=518" in r for r in gpu), gpu
    assert any(r.startswith("srt:") and "radius=3" in r and "vit_base" in r for r in gpu)    # 49 shifts
    assert any(r.startswith("srt_plain:") and "radius=3" in r and "vit_base" in r for r in gpu)
    assert any(r.startswith("stage1_extract:") and "views=769" in r and "preset=paper" in r for r in gpu)
    fit = {(p["compile"], p["images"]) for c, p in plan_rows("gpu", ["stage1_fit"])}
    assert {("off", 1), ("off", 4), ("off", 8), ("on", 1), ("graph", 1), ("graph", 4), ("graph", 8)} <= fit, fit
    for c in load_cases().values():
        assert c.opt_in or all(c.plans.get(p) for p in ("tiny", "cpu")), c.name


def test_case_list_is_built_when_asked():
    "No registry is filled at import: each call builds the list anew, and a source's cases join only where named."
    a, b = load_cases(), load_cases()
    assert a is not b and list(a) == list(b)
    assert "_ok" not in a and "_ok" in load_cases((*bench.CASE_SOURCES, f"{__name__}:extra_cases"))
    assert "_ok" not in load_cases()
