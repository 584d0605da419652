#!/usr/bin/env bash
# The clean reference backbone (adapters_zoo/backbone_clean): SimMIM on every image and volume slice of
# ../shared/data except the sites any report calls unseen (fundus CHASE_DB1, both polyp sets with their _subset
# folders, X-ray imlab-demo), 1 CPU thread. Same architecture and crops as examples/pretrain_reference.sh.
# Resumable: rerun with --resume (and, to stop early, --steps N: the cosine schedule is then recomputed for N).
set -euo pipefail
DATA="${M4OE_DATA:-../shared/data}"
m4oe pretrain "$DATA/manifest.csv" --out runs/pretrain_clean \
  --exclude-sites CHASE_DB1,Kvasir-SEG,CVC-ClinicDB,imlab-demo \
  --model-args '{"embed_dim": 48, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7}' \
  --img-size 224 --crop-size 128 --batch 16 --steps 1800 --lr 5e-4 --checkpoint-every 100 --preview-every 300 \
  --threads 1 --dtype fp16 "$@"
