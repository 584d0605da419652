#!/usr/bin/env bash
# Site generalisation (Cekmeceli et al. protocol) on the shared data, all five modes, 5 and all labelled images.
# Usage: examples/site_generalisation.sh WEIGHTS OUT_PREFIX [extra m4oe eval options]
#   WITH_XRAY=0 skips the third modality (X-ray).
#   WEIGHTS: adapters_zoo/backbone (the reference SimMIM backbone) or 'none' (same architecture, random weights)
set -euo pipefail
WEIGHTS="${1:-adapters_zoo/backbone}"
OUT="${2:-runs/sitegen}"
shift 2 || true
DATA="${M4OE_DATA:-../shared/data}"
ARCH=(--backbone timm:swin_tiny_patch4_window7_224 --weights "$WEIGHTS"
      --model-args '{"embed_dim": 48, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7}')
COMMON=(--data "$DATA" --modes experts,decoder,lora,full,scratch --shots 5,all --steps 150 --batch 4 --size 224
        --max-test-images 8 --no-progress)
m4oe eval "${ARCH[@]}" "${COMMON[@]}" --modality fundus --train-sites DRIVE --test-sites CHASE_DB1 \
  --resize crop --out "${OUT}_fundus" "$@"
m4oe eval "${ARCH[@]}" "${COMMON[@]}" --modality endoscopy --train-sites CVC-ClinicDB --test-sites Kvasir-SEG \
  --resize resize --out "${OUT}_endoscopy" "$@"
if [[ "${WITH_XRAY:-1}" == 1 ]]; then  # 2828x2320 images (Dice at native size): 13 min on 2 cores
  m4oe eval "${ARCH[@]}" "${COMMON[@]}" --modality xray --train-sites COVID-CXR-GeneralBlockchain \
    --test-sites imlab-demo --resize resize --out "${OUT}_xray" "$@"
fi
