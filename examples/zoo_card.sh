#!/usr/bin/env bash
# adapters_zoo/README.md from the zoo (index.json, build_summary.json, backbone/config.json) and the hand-written
# sections in examples/zoo_card/ (readings of runs, each with its command).
# The --note lines are readings of the adapter table, kept here so the card is rebuilt with them.
set -euo pipefail
python examples/zoo_card.py \
  --command "Run in five sittings, each a \`--resume\` with a new \`--steps\` as the shared CPU allowed (\`examples/pretrain_clean.sh\`, header), so the cosine learning rate stepped back up at steps 200, 350 and 600 (warm restarts, \`backbone/log.csv\`)." \
  --note "Targets of the new-site issue (README, \"New sites\"): fundus DRIVE in-domain ≥ 80 (80.7; 3 seeds of the CLAHE recipe 80.5 ± 0.4: met), DRIVE → CHASE_DB1 zero-shot ≥ 70 (64.9; 64.4 ± 1.6: missed), endoscopy in-domain ≥ 85 (52.7 on both polyp sets' held-out images) and across polyp sets ≥ 70 (30.5, the CVC-ClinicDB-only adapter this one replaced, on Kvasir-SEG): missed. The backbone never saw an endoscopy image (both polyp sets are tested, so both are excluded from its pretraining)." \
  --note "Cardiac MRI: per class in \`reports/MRI-cardiac/report.md\`; its in-domain Dice is the mean over the 98 test slices (the per-volume 3D Dice is in the report)." \
  --note "Modalities of the shared data without an adapter: the 3-slice DICOM CT (\`CT_dcmqi_3slice\`, too few images) and the spinal-cord MRI (\`SCT_spinalcord_MRI\`, a different task from cardiac MRI; not built for time)." \
  --section examples/zoo_card/routing.md --section examples/zoo_card/new_sites.md --section examples/zoo_card/history.md \
  "$@"
