#!/usr/bin/env bash
# Flip test-time augmentation on the zoo fundus adapter, DRIVE test (in-domain) and CHASE_DB1 (unseen)
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 M4OE_DATA=${M4OE_DATA:-../shared/data}
for tta in none flips; do
  for site in DRIVE CHASE_DB1; do
    split=""; [ $site = DRIVE ] && split="--split test"
    [ -f runs/tta_fundus/fundus_${site}_$tta/metrics.json ] && continue
    start=$(date +%s)
    nice -n 5 python -m m4oe_adapters.cli eval --backbone timm:swin_tiny_patch4_window7_224 --weights adapters_zoo/backbone \
      --data "$M4OE_DATA" --modality fundus --adapter adapters_zoo/fundus.safetensors --sites $site $split --tta $tta \
      --no-progress --out runs/tta_fundus/fundus_${site}_$tta
    echo "$site $tta $(( $(date +%s) - start )) s"
  done
done
