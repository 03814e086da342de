#!/bin/sh
# Per-image CPU time of stage 1 (dvt_denoise = python -m dvt.stage1_data) on skimage photos, 1 torch thread.
# Usage: sh benchmarks/stage1_cpu.sh [workdir]   (results: the "per image" and "process" lines)
set -e
W=${1:-/tmp/dvt_stage1_bench}
mkdir -p "$W"
python3 - "$W" <<'PY'
import sys; from pathlib import Path; from PIL import Image; from dvt.data import sample_image
w = Path(sys.argv[1])
for folder, names in (("imgs", ("astronaut", "coffee", "chelsea", "rocket")), ("imgs2", ("astronaut", "coffee")), ("imgs1", ("astronaut",))):
    (w / folder).mkdir(exist_ok=True)
    for k in names: Image.fromarray((sample_image(k).permute(1, 2, 0) * 255).round().byte().numpy()).save(w / folder / f"{k}.png")
PY
cd "$W"
run() { echo "== $1 $2 ($3)"; /usr/bin/time -f "process: %e s wall, %U s user, %S s sys" python3 -m dvt.stage1_data $3 --out out/$1-$2 --model $2 $4 --preset $1 --threads 1 --overwrite 2>&1 | grep -E "dvt_denoise|process"; }
run smoke planted imgs ""
run smoke vit_small_patch14_dinov2.lvd142m imgs --random-init
run smoke vit_base_patch14_dinov2.lvd142m imgs --random-init
run default planted imgs2 ""
run default vit_small_patch14_dinov2.lvd142m imgs1 --random-init
run default vit_base_patch14_dinov2.lvd142m imgs1 --random-init
