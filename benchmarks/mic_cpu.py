"""Time `dvt.metrics.mic` against minepy's C library (libmine) and, optionally, an earlier dvt implementation.

minepy's Python package no longer builds on Python 3.11 / NumPy 2, so its C library is compiled on its own from the
minepy 1.2.6 source (PyPI sdist, `libmine/mine.c`) and called through ctypes:

    gcc -O3 -fPIC -shared minepy-1.2.6/libmine/mine.c -o /tmp/libmine.so -lm
    git show c08460b:dvt/metrics.py > /tmp/metrics_before.py        # optional: the implementation before batching
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/mic_cpu.py --libmine /tmp/libmine.so --before /tmp/metrics_before.py

CPU time of this process (`time.process_time`), one MIC per call, the implementations interleaved call by call, the
median of `--repeats`; alpha = 0.6, c = 15 (minepy's defaults). Prints a Markdown table and the load (`uptime`).
"""
import argparse, ctypes, importlib.util, subprocess, sys, time
import numpy as np
from dvt.metrics import mic


class _Problem(ctypes.Structure): _fields_ = [("n", ctypes.c_int), ("x", ctypes.POINTER(ctypes.c_double)), ("y", ctypes.POINTER(ctypes.c_double))]
class _Param(ctypes.Structure): _fields_ = [("alpha", ctypes.c_double), ("c", ctypes.c_double), ("est", ctypes.c_int)]


def libmine_mic(path: str):
    "A `mic(x, y)` calling `mine_compute_score` of the compiled libmine at `path` (est = 0: mic_approx)."
    lib = ctypes.CDLL(path)
    lib.mine_compute_score.restype, lib.mine_compute_score.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p]
    lib.mine_mic.restype, lib.mine_mic.argtypes = ctypes.c_double, [ctypes.c_void_p]
    lib.mine_free_score.argtypes = [ctypes.c_void_p]
    def f(x, y, alpha=0.6, c=15):
        x, y = np.ascontiguousarray(x, np.float64), np.ascontiguousarray(y, np.float64)
        dp = ctypes.POINTER(ctypes.c_double)
        score = lib.mine_compute_score(ctypes.byref(_Problem(len(x), x.ctypes.data_as(dp), y.ctypes.data_as(dp))),
                                       ctypes.byref(_Param(alpha, c, 0)))
        v = lib.mine_mic(score); lib.mine_free_score(ctypes.byref(ctypes.c_void_p(score)))
        return v
    return f


def module_mic(path: str):
    "`mic` of a dvt.metrics module saved at `path` (e.g. from `git show <commit>:dvt/metrics.py`)."
    spec = importlib.util.spec_from_file_location("metrics_before", path); mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod); return mod.mic


def cases(n: int, rng) -> dict:
    x = rng.random(n); e = rng.standard_normal(n)
    return {"y = x": (x, x), "y = x²": (x, x ** 2), "y = sin(8πx)": (x, np.sin(8 * np.pi * x)),
            "y = sin(6x) + 0.5·N(0,1)": (x, np.sin(6 * x) + 0.5 * e), "independent uniforms": (x, rng.random(n))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--libmine", required=True, help="compiled libmine shared library")
    ap.add_argument("--before", help="an earlier dvt/metrics.py to time as well")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 500]); ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    impls = {"dvt": mic, "libmine": libmine_mic(a.libmine)} | ({"before": module_mic(a.before)} if a.before else {})
    print("load before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), file=sys.stderr)
    cols = " | ".join(f"{k} (ms)" for k in impls)
    print(f"| n | data | {cols} | dvt / libmine |" + (" dvt / before |" if a.before else "") + " max abs diff of MIC |")
    print("|---" * (4 + len(impls) + bool(a.before)) + "|")
    for n in a.sizes:
        for name, (x, y) in cases(n, np.random.default_rng(0)).items():
            ts, vals = {k: [] for k in impls}, {}
            for _ in range(a.repeats):
                for k, f in impls.items():
                    t = time.process_time(); vals[k] = f(x, y); ts[k].append(time.process_time() - t)
            med = {k: 1e3 * float(np.median(v)) for k, v in ts.items()}
            row = f"| {n:,} | {name} | " + " | ".join(f"{med[k]:.2f}" for k in impls) + f" | {med['dvt'] / med['libmine']:.2f} |"
            row += f" {med['dvt'] / med['before']:.2f} |" if a.before else ""
            print(row + f" {max(abs(v - vals['libmine']) for v in vals.values()):.1e} |", flush=True)
    print("load after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), file=sys.stderr)


if __name__ == "__main__":
    main()
