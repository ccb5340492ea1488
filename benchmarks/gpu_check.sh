#!/usr/bin/env bash
# One prepared run on a CUDA machine, about 5 minutes of work (H100/H200):
#   1. the CUDA paths of stage 2 against the CPU (benchmarks/gpu_paths.py);
#   2. the evidence study's GPU configuration (python -m benchmarks.study --mode gpu): the long
#      CPU configuration (ResNet-18, 64 px) trained for hundreds of epochs, stopping new units
#      after 4.5 minutes.
#
# Prepare once, on the machine that sends the job (the GPU machine has no network and takes
# 64 MiB of files per call), after the CPU study has mined once:
#   echo /.gpu/ >> .git/info/exclude
#   python benchmarks/gpu_prepare.py
# Run (carry .gpu):  bash benchmarks/gpu_check.sh   -> results under $OUT (or benchmarks/results/gpu)
# Then, here: copy study_gpu.json into benchmarks/results/ and the gpu_* files into
# benchmarks/results/gpu/, then `python -m benchmarks.study --report-only`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
DATA=${DATA:-.gpu/data}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_device.txt"
nproc >> "$OUT/gpu_device.txt"

status=0
python3 benchmarks/gpu_paths.py --images "$DATA/coco128/images" \
  --proposals .gpu/work/proposals/ss500.jsonl --out "$OUT/gpu_paths.json" > "$OUT/gpu_paths.log" 2>&1 || status=1
tail -5 "$OUT/gpu_paths.log"

# The report goes to a scratch file: docs/RESULTS.md is regenerated here from all results.
python3 -m benchmarks.study --mode gpu --data "$DATA" --work .gpu/work --out "$OUT" --doc /tmp/RESULTS.md \
  2>&1 | tee "$OUT/study_gpu.log" | grep -v Warning || status=1
exit $status
