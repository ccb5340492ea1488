#!/usr/bin/env bash
# The three ORL stages on the bundled sample through the CLI, then evaluation and pictures.
set -euo pipefail
ORL=${ORL:-orl}
PRESET=${PRESET:-tiny}
EPOCHS=${EPOCHS:-5}
OUT=${OUT:-runs/demo}
IMAGES=data/sample/images
LABELS=data/sample/labels

step() { printf '\n== %s\n' "$*"; }
step "stage 1: BYOL pre-training ($PRESET preset, $EPOCHS epochs)"
$ORL pretrain --images $IMAGES --out $OUT/stage1 --preset $PRESET --epochs $EPOCHS
step "stage 2: correspondence discovery"
$ORL mine --images $IMAGES --checkpoint $OUT/stage1/last.pt --out $OUT/mine
step "stage 3: ORL pre-training (global + intra-RoI + inter-RoI)"
$ORL train --images $IMAGES --pairs $OUT/mine --out $OUT/stage3 --preset $PRESET --epochs $EPOCHS
step "evaluation (labels are read only here)"
$ORL eval --checkpoint $OUT/stage1/last.pt --images $IMAGES --labels $LABELS --out $OUT/eval_stage1.json >/dev/null
$ORL eval --checkpoint $OUT/stage3/last.pt --images $IMAGES --labels $LABELS --out $OUT/eval_stage3.json >/dev/null
step "pictures: mined pairs and attention maps"
$ORL render-pairs --pairs $OUT/mine --images $IMAGES --out $OUT/pairs --n 8 >/dev/null
first=$(ls $IMAGES/val2017/*.jpg | head -1)
$ORL attention --checkpoint $OUT/stage1/last.pt --image "$first" --out $OUT/attention_stage1.png >/dev/null
$ORL attention --checkpoint $OUT/stage3/last.pt --image "$first" --out $OUT/attention_stage3.png >/dev/null

cat <<MSG

Done. Results are in $OUT/:
  stage1/last.pt, stage3/last.pt    checkpoints (config inside); backbone.pth = torchvision weights
  stage1/metrics.csv, stage3/...    loss curves
  mine/correspondence.json          mined RoI pairs, the authors' layout plus scores
  mine/image_status.csv             every image: ok / no_boxes / failed, with the reason
  pairs/top_*.png                   the best mined pairs, boxes in matching colours
  attention_stage{1,3}.png          attention maps of the same photo under both checkpoints
  eval_stage{1,3}.json              object-level probe and VOC07-style SVM mAP
The tiny preset only shows the pipeline working; use PRESET=cpu (tens of minutes) or
PRESET=paper (GPU) for real pre-training: make demo PRESET=cpu DEMO_EPOCHS=30
MSG
