#!/usr/bin/env bash
# GPU variant of the stage-2 benchmark, plus checks of the CUDA code paths. One prepared run,
# under 5 minutes on an H100/H200, for the `device` tool of our workplace (or any CUDA box).
#
# Prepare once, on the machine that sends the job (the GPU machine has no network):
#   echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu/wheels
#   cp -r ../shared/data/coco128 .gpu/coco128
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#       -d .gpu/wheels opencv-contrib-python-headless==5.0.0.93 faiss-cpu==1.15.1
# Run (carry .gpu):  bash benchmarks/gpu_check.sh   -> results under $OUT (or benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ -d .gpu/wheels ] && ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  # the GPU image ships opencv-python-headless without the contrib modules (no ximgproc)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
DATA=${DATA:-.gpu/coco128}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_device.txt"

# 1. CUDA paths against the CPU: KNN (torch topk vs faiss), RoI features, a bf16 training step.
python3 - <<'PY' 2>&1 | tee "$OUT/gpu_paths.txt"
import json, os, numpy as np, torch
from orl.config import get_preset
from orl.mining import knn_search, embed_rois
from orl.models import build_model
from orl.images import load_rgb, list_images
x = np.random.default_rng(0).normal(size=(5000, 256)).astype("float32")
x /= np.linalg.norm(x, axis=1, keepdims=True)
ic, sc = knn_search(x, 10, "cpu"); ig, sg = knn_search(x, 10, "cuda")
res = {"knn_identical_indices": float((ic == ig).mean()), "knn_max_sim_diff": float(np.abs(sc - sg).max())}
cfg = get_preset("cpu")
m = build_model(cfg.model, "byol").eval()
root = os.environ.get("DATA", ".gpu/coco128") + "/images"
img = load_rgb(os.path.join(root, list_images(root)[0]))
boxes = np.array([[0, 0, 200, 200], [100, 50, 400, 300.0]])
fc, _ = embed_rois(m.backbone, img, boxes, cfg.mine, "cpu")
fg, _ = embed_rois(m.cuda().backbone, img, boxes, cfg.mine, "cuda")
res["roi_feature_max_diff"] = float(np.abs(fc - fg).max())
print(json.dumps(res, indent=2))
PY

# 2. The mining benchmark on CUDA: paper preset (ResNet-50), a short stage 1 on coco128.
python3 benchmarks/mining_benchmark.py --images "$DATA/images" --labels "$DATA/labels" --device cuda \
  --preset paper --epochs 30 --ref-queries 8 --repeats 3 --work /tmp/orl_gpu_work \
  --out "$OUT/mining_coco128_gpu.json" 2>&1 | grep -v faiss | tail -20
