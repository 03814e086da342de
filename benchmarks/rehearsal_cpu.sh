#!/usr/bin/env bash
# The whole rehearsal for one model, one job per process (so each job's peak memory is its own), on this CPU.
# Usage: benchmarks/rehearsal_cpu.sh [MODEL] [RESULTS]   (default: ViT-B, /tmp/dvt_rehearsal)
# Writes benchmarks/rehearsal_cpu.tsv: job, exit code, wall seconds, peak RSS (MB), the load average at the start.
set -u
MODEL=${1:-vit_base_patch14_dinov2.lvd142m}
RESULTS=${2:-/tmp/dvt_rehearsal}
OUT=$(dirname "$0")/rehearsal_cpu.tsv
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
EVAL="python -c 'from dvt.evaljobs import eval_cli; eval_cli()'"
printf "job\trc\twall_s\tpeak_rss_mb\tload_at_start\n" > "$OUT"
eval "$EVAL plan --profile rehearsal --models $MODEL --results $RESULTS --no-check" | grep "dvt_eval run" | sed 's/.*dvt_eval run //' |
while read -r args; do
  load=$(cut -d' ' -f1 /proc/loadavg)
  /usr/bin/time -f "%e %M" -o /tmp/rehearsal_time.txt bash -c "$EVAL run $args --results $RESULTS --device cpu --threads 1" > /tmp/rehearsal_job.log 2>&1
  rc=$?
  read -r wall rss < /tmp/rehearsal_time.txt
  job=$(echo "$args" | sed -E 's/.*--task ([^ ]+) --model ([^ ]+) --variant ([^ ]+).*/\1\/\2__\3/')
  printf "%s\t%s\t%s\t%.0f\t%s\n" "$job" "$rc" "$wall" "$(echo "$rss / 1024" | bc -l)" "$load" | tee -a "$OUT"
done
