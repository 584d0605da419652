#!/usr/bin/env bash
# The reference backbone of adapters_zoo/: SimMIM on every image of ../shared/data (masks unused), 1 CPU thread.
set -euo pipefail
DATA="${M4OE_DATA:-../shared/data}"
m4oe pretrain "$DATA/manifest.csv" --out runs/pretrain_ref \
  --model-args '{"embed_dim": 48, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7}' \
  --img-size 224 --crop-size 128 --batch 16 --steps 3500 --lr 5e-4 --checkpoint-every 250 --preview-every 500 \
  --threads 1 --dtype fp16 "$@"
