#!/usr/bin/env bash
# The clean reference backbone (adapters_zoo/backbone): SimMIM on every image and volume slice of
# ../shared/data except the sites any report calls unseen (fundus CHASE_DB1, both polyp sets with their _subset
# folders, X-ray imlab-demo), 1 CPU thread. Same architecture and crops as examples/pretrain_reference.sh.
# Resumable: rerun with --resume (and, to stop early, --steps N: the cosine schedule is then recomputed for N).
# The shipped adapters_zoo/backbone was run in sittings, each a --resume with a new --steps as the shared CPU allowed:
#   --steps 1800 (stopped at step 100), then --resume --steps 400 (stopped at 200), --resume --steps 550 (at 350),
#   --resume --steps 900 (at 600), --resume --steps 1300 (to the end), all with --checkpoint-every 50 after the first.
# Each change recomputes the cosine for the new total, so the learning rate steps up at 200, 350 and 600 (warm
# restarts); runs/pretrain_clean/log.csv and backbone/log.csv hold the lr of every step.
set -euo pipefail
DATA="${M4OE_DATA:-../shared/data}"
m4oe pretrain "$DATA/manifest.csv" --out runs/pretrain_clean \
  --exclude-sites CHASE_DB1,Kvasir-SEG,CVC-ClinicDB,imlab-demo \
  --model-args '{"embed_dim": 48, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7}' \
  --img-size 224 --crop-size 128 --batch 16 --steps 1800 --lr 5e-4 --checkpoint-every 100 --preview-every 300 \
  --threads 1 --dtype fp16 "$@"
