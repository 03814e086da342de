#!/usr/bin/env bash
# The whole rehearsal for one model, one job per process (so each job's peak memory is its own), on this CPU.
# Usage: benchmarks/rehearsal_cpu.sh [MODEL] [RESULTS]   (default: ViT-B, /tmp/dvt_rehearsal); env OUT=file.tsv, REVERSE=1,
#        ORDER=kinds (the training jobs, then one job of every task and of every simple variant kind, cheapest first, then the rest
#        by estimated cost), PLAN="--tasks davis --variants srt" (more `dvt_eval plan` options: a part of the plan)
# Writes benchmarks/rehearsal_cpu.tsv: job, exit code, wall seconds, peak RSS (MB), the load average at the start.
set -u
MODEL=${1:-vit_base_patch14_dinov2.lvd142m}
RESULTS=${2:-/tmp/dvt_rehearsal}
OUT=${OUT:-$(dirname "$0")/rehearsal_cpu.tsv}     # REVERSE=1: the plan from its end (a second worker meets the first)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
EVAL="python -c 'import sys; from dvt.evaljobs import eval_cli; sys.exit(eval_cli())'"   # as the console script
OUT=$(realpath "$OUT"); mkdir -p "$RESULTS"; cd "$RESULTS"    # not the checkout: PYTHONPATH / the installed package decide which dvt runs
TMP=$(mktemp -d)                                              # this worker's own log and timing files
kinds_first() {   # plan lines on stdin -> the same lines, every job kind once before any repeat (by estimated cost)
  python -c '
import re, sys
from dvt.evaljobs import Job, estimate_gpu_hours
lines = [l.rstrip("\n") for l in sys.stdin if l.strip()]
job = lambda l: Job(*(re.search(f"--{k} (\\S+)", l).group(1) for k in ("model", "variant", "task", "profile")))
cost = {l: estimate_gpu_hours(job(l)) for l in lines}
first, seen = [], set()
train = lambda j: j.task in ("train", "distill")
for l in sorted(lines, key=lambda l: (not train(job(l)), 0 if train(job(l)) else cost[l])):
    j = job(l)                                    # composite variants (ours+srt) repeat the code of their parts: not first
    if train(j) or ("t", j.task) not in seen or ("v", j.variant) not in seen and "+" not in j.variant:
        first.append(l); seen |= {("t", j.task), ("v", j.variant)}
print("\n".join(first + sorted((l for l in lines if l not in first), key=cost.get)))'
}
printf "job\trc\twall_s\tpeak_rss_mb\tload_at_start\n" > "$OUT"
eval "$EVAL plan --profile rehearsal --models $MODEL --results $RESULTS --no-check ${PLAN:-}" | grep "dvt_eval run" | sed 's/.*dvt_eval run //' | { if [ "${REVERSE:-0}" = 1 ]; then tac; elif [ "${ORDER:-plan}" = kinds ]; then kinds_first; else cat; fi; } |
while read -r args; do
  load=$(cut -d' ' -f1 /proc/loadavg)
  /usr/bin/time -f "%e %M" -o "$TMP/time.txt" bash -c "$EVAL run $args --results $RESULTS --device cpu --threads 1" > "$TMP/job.log" 2>&1
  rc=$?
  read -r wall rss < <(tail -n 1 "$TMP/time.txt")   # the last line (a failed command adds one before it)
  job=$(echo "$args" | sed -E 's/.*--task ([^ ]+) --model ([^ ]+) --variant ([^ ]+).*/\1\/\2__\3/')
  printf "%s\t%s\t%s\t%.0f\t%s\n" "$job" "$rc" "$wall" "$(echo "$rss / 1024" | bc -l)" "$load" | tee -a "$OUT"
done
