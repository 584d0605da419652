#!/usr/bin/env bash
# adapters_zoo/README.md from the zoo, its backbone files and the random-weights adapters (runs/zoo_random, made by
# `python examples/build_zoo.py --weights none --zoo runs/zoo_random --only fundus,endoscopy,dermoscopy`).
# The --note/--verdict lines are readings of those numbers, kept here so the card is rebuilt with them.
set -euo pipefail
python examples/zoo_card.py --random runs/zoo_random \
  --note "MRI-cardiac was first trained with the 150 steps of the other recipes and predicted background everywhere (in-domain Dice 0); at 400 steps it reaches 49.8 (per class in \`reports/MRI-cardiac/report.md\`: LV 81.3, myocardium 59.9, RV 8.3: the right ventricle is not learnt yet). Its validation Dice (29.5) comes from 4 validation slices." \
  --note "Modalities of the shared data without an adapter: the 3-slice DICOM CT (\`CT_dcmqi_3slice\`, too few images) and the spinal-cord MRI (\`SCT_spinalcord_MRI\`, a different task from cardiac MRI; not built for time)." \
  --verdict "Pretraining helps unevenly on this evidence: endoscopy in-domain +13.6 and fundus unseen-site +5.2 (CHASE_DB1), but endoscopy on the unseen Kvasir-SEG site −17.8 (5 images, both backbones weak there) and no change beyond noise for dermoscopy and fundus in-domain (−1.3, −0.5). A 2000-step SimMIM on 896 images is a small pretraining; the frozen random Swin plus the per-modality decoder is already a strong baseline on these small test sets." \
  "$@"
