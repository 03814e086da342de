#!/bin/sh
# The prepared GPU run: every row of `dvt_bench --profile gpu`, under 8 minutes on one H100/H200 (see README.md).
# Usage, from the repository root:  sh benchmarks/gpu.sh [OUT_DIR]
#   writes OUT_DIR/results_gpu.csv and .md (default OUT_DIR: benchmarks/, i.e. the table in the repository);
#   another OUT_DIR starts from a copy of the repository's table, so the run replaces its "not measured" rows.
# Exit status 1 when a row failed (the table still holds every row, with the error).
set -e
OUT=${1:-benchmarks}
mkdir -p "$OUT"
if [ "$OUT" != benchmarks ] && [ -f benchmarks/results_gpu.csv ]; then cp benchmarks/results_gpu.csv "$OUT/results_gpu.csv"; fi
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" python -c "import sys; from dvt.bench import bench_cli; bench_cli(['--profile', 'gpu', '--out', sys.argv[1]])" "$OUT/results_gpu"
