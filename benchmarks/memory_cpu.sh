#!/usr/bin/env bash
# Peak memory of the largest shapes of the full protocols (issue: "memory at real scale"), one process each, on a CPU,
# with random-init weights: SRT's 49 shifts on one DAVIS 480p frame with ViT-B, and stage 1 at 518 with ViT-L
# (16 of the paper's 769 views, to keep the CPU time in minutes; the view pool grows linearly, see the README).
# Usage: benchmarks/memory_cpu.sh [OUT.tsv]
set -u
OUT=${1:-$(dirname "$0")/memory_cpu.tsv}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
printf "what\trc\twall_s\tpeak_rss_mb\n" > "$OUT"
run() {  # name, python code
  /usr/bin/time -f "%e %M" -o /tmp/dvt_mem_time.txt python -c "$2" > /tmp/dvt_mem.log 2>&1; rc=$?
  read -r wall rss < <(tail -n 1 /tmp/dvt_mem_time.txt)
  printf "%s\t%s\t%s\t%.0f\n" "$1" "$rc" "$wall" "$(echo "$rss / 1024" | bc -l)" | tee -a "$OUT"; tail -n 2 /tmp/dvt_mem.log
}
run "ViT-B/14 forward, one 476x854 frame (baseline for the next row)" '
import torch, dvt; torch.manual_seed(0)
bb = dvt.make_backbone("vit_base_patch14_dinov2.lvd142m", pretrained=False)
with torch.no_grad(): print(tuple(bb(torch.rand(1, 3, 476, 854)).shape))'
run "SRT 49 shifts (radius 3), ViT-B/14, one 476x854 DAVIS frame, tokens" '
import torch, dvt; torch.manual_seed(0)
bb = dvt.make_backbone("vit_base_patch14_dinov2.lvd142m", pretrained=False)
print(tuple(dvt.srt(bb, torch.rand(1, 3, 476, 854), radius=3, batch_size=8, progress=False).shape))'
run "stage 1 paper preset at 518, ViT-L/14, 16 views, 20 steps" '
import torch, dvt; torch.manual_seed(0)
bb = dvt.make_backbone("vit_large_patch14_dinov2.lvd142m", pretrained=False)
r = dvt.denoise_image(bb, dvt.sample_image("astronaut"), preset="paper", n_views=16, steps=20, extract_batch=4)
print(r)'
