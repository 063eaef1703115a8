#!/usr/bin/env bash
# One call on a lent GPU: gpu-marked tests, the benchmarks at real sizes, and a short real MicroDiT_XL_2 run.
# Results land in $OUT (bench.json, train_metrics.jsonl, logs); commit the numbers under bench/results/.
# Usage on the device: bash bench/gpu_session.sh   (wheels the image lacks: see ../shared/gpu/fetch-wheels.sh)
set -uo pipefail
OUT=${OUT:-/tmp/tessera_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

python setup.py build_ext --inplace 2>&1 | tail -3 | tee "$OUT/build_ext.log"   # the csrc/ CUDA gather
python -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
python -m pytest bench --benchmark-only -q -p no:cacheprovider --benchmark-json "$OUT/bench.json" 2>&1 \
  | tee "$OUT/bench.log" | tail -15

# A short real run: phase-1 shapes on random latents, one GPU, 30 steps at micro-batch 128.
torchrun --standalone --nproc_per_node=1 engine/train.py --config configs/microdit_xl_256_masked.yaml \
  run.out_dir=/tmp/tessera_runs run.name=xl_smoke train.steps=30 train.global_batch=128 train.micro_batch=128 \
  train.log_every=10 train.ckpt_every=1000 train.progress_bar=false data.source=random data.vae="" 2>&1 | tee "$OUT/train.log" | tail -5
cp /tmp/tessera_runs/xl_smoke/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null || true
