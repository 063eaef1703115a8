#!/usr/bin/env bash
# GPU work for a lent device machine, in steps that each fit one device call (10 minutes, 8 files back):
#
#   bash bench/gpu_session.sh check              device + software, csrc/ build, token/norm/MoE kernel tests on CUDA
#   bash bench/gpu_session.sh kernels            bench/test_kernels.py (gather, norm, residual_norm, MoE) at XL shapes
#   bash bench/gpu_session.sh attention          tests/test_attention.py on CUDA, then bench/test_attention.py
#   bash bench/gpu_session.sh train              XL 256-px masked step at the largest micro-batch + a 30-step XL run
#   bash bench/gpu_session.sh settings           XL step as configured vs compile off / reshard after forward on /
#                                                padded captions with a key mask (one setting turned back per row)
#   bash bench/gpu_session.sh kernels attention  several steps in one call
#   bash bench/gpu_session.sh quick              one call for a 15-minute lease: build, kernels, attention and XL-step
#                                                benches (fewer rounds), then the CUDA tests, all inside QUICK_S seconds
#                                                (default 540); result files + one tarball of the logs under $OUT
#
# Every benchmark step writes pytest-benchmark JSON and a bench/summarize.py result file (device, versions, commit,
# date, rows, target verdicts) under $OUT and prints the side-by-side table last. Commit the result files under
# bench/results/. The image lacks diffusers/omegaconf/datasets; nothing here needs them (random latents and captions).
set -uo pipefail
OUT=${OUT:-/tmp/tessera_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
# Each CUDA test failure's traceback, written as it happens (root conftest): a step cut off by its time limit ends
# before pytest's summary, and its failures would otherwise come back as bare names.
export TESSERA_FAILURES_LOG=${TESSERA_FAILURES_LOG:-$OUT/test_failures.txt}
PY=${PY:-python3}
# CUDA tests are mostly Triton compiles (CPU-bound): 8 workers on the device's 16 cores, not the suite's usual 4. On
# 12-04, 4 workers got through 268 of them in the ~200 s the quick step had left.
TEST_WORKERS=${TEST_WORKERS:-8}
DAY=$(date +%F)

bench() {  # bench NAME FILE...: run pytest-benchmark on FILEs, then summarize into $OUT/NAME.summary.json
  local name=$1; shift
  $PY -m pytest "$@" --benchmark-only -q -p no:cacheprovider --benchmark-json "$OUT/$name.bench.json" \
    >"$OUT/$name.log" 2>&1
  echo "pytest $name: exit $? ($(tail -1 "$OUT/$name.log"))"
  local gpu
  gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo cpu)
  $PY bench/summarize.py "$OUT/$name.bench.json" --out "$OUT/${DAY}_${gpu}_${name}.json"
}

show_failures() {  # the last lines of each failure so far (the whole tracebacks come back in the file)
  [ -s "$TESSERA_FAILURES_LOG" ] && grep -E "^(====|E )" "$TESSERA_FAILURES_LOG" | tail -40
  return 0
}

step_check() {
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  } 2>&1 | tee "$OUT/device.txt"
  $PY setup.py build_ext --inplace >"$OUT/build_ext.log" 2>&1
  echo "build_ext: exit $? ($(tail -1 "$OUT/build_ext.log"))"
  # The token/norm/MoE kernel test files on CUDA: gpu-marked XL shapes and the odd-shape tables, compiled for real.
  timeout 480 $PY -m pytest tests/test_kernels_*.py tests/test_csrc_sm90.py -q -p no:cacheprovider -rs \
    -n "$TEST_WORKERS" >"$OUT/gpu_tests.log" 2>&1
  echo "kernel tests on the GPU: exit $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.log" | tail -15
  show_failures
}

step_kernels() { bench kernels bench/test_kernels.py; }
step_settings() {
  # compile, reshard_after_forward and the caption key mask: each row turns one configured setting back (GPU speed of
  # the three throughput settings of the phase configs); the compiled rows compile first, outside the timing.
  $PY setup.py build_ext --inplace >/dev/null 2>&1
  bench settings bench/test_train_step.py -k settings
}
step_attention() {
  # Attention tests on CUDA first (each new shape autotunes the Triton kernels: compiles dominate), then the bench.
  timeout 360 $PY -m pytest tests/test_attention.py -q -p no:cacheprovider -rs -n "$TEST_WORKERS" \
    >"$OUT/attention_tests.log" 2>&1
  echo "attention tests on the GPU: exit $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/attention_tests.log" | tail -10
  show_failures
  bench attention bench/test_attention.py
}

step_train() {
  $PY setup.py build_ext --inplace >/dev/null 2>&1
  bench train_step bench/test_train_step.py -k "not settings"
  # A short real run: phase-1 shapes on random latents and captions, one GPU, 30 steps at micro-batch 128. Eager:
  # compiling every block would take much of this call; the settings step measures what compile gains.
  $PY -m torch.distributed.run --standalone --nproc_per_node=1 engine/train.py \
    --config configs/microdit_xl_256_masked.yaml \
    run.out_dir=/tmp/tessera_runs run.name=xl_smoke train.steps=30 train.global_batch=128 train.micro_batch=128 \
    train.log_every=10 train.ckpt_every=1000 train.progress_bar=false data.source=random data.vae='""' \
    train.compile=false \
    >"$OUT/train.log" 2>&1
  echo "train run: exit $?"; tail -4 "$OUT/train.log"
  cp /tmp/tessera_runs/xl_smoke/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null || true
}

step_quick() {
  # Every part is cut off at the deadline rather than the call: what finished still comes back (8 files at most).
  local end=$((SECONDS + ${QUICK_S:-540})) logs=$OUT/logs
  mkdir -p "$logs"
  left() { local r=$((end - SECONDS)); [ "$r" -gt "$1" ] && r=$1; [ "$r" -lt 1 ] && r=1; echo "$r"; }
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  } >"$OUT/device.txt" 2>&1
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} timeout "$(left 150)" $PY setup.py build_ext --inplace \
    >"$logs/build_ext.log" 2>&1
  echo "build_ext: exit $? at ${SECONDS}s"
  local gpu name cap files
  gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().split()[-1])" 2>/dev/null || echo cpu)
  for spec in "kernels:150:bench/test_kernels.py" "attention:110:bench/test_attention.py" \
              "train_step:200:bench/test_train_step.py -k xl_256_masked_step"; do
    IFS=: read -r name cap files <<<"$spec"
    # shellcheck disable=SC2086
    timeout "$(left "$cap")" $PY -m pytest $files --benchmark-only -q -p no:cacheprovider --tb=short \
      --benchmark-max-time=0.25 --benchmark-min-rounds=5 --benchmark-json "$logs/$name.bench.json" \
      >"$logs/$name.log" 2>&1
    echo "$name: exit $? at ${SECONDS}s ($(tail -1 "$logs/$name.log"))"
    $PY bench/summarize.py "$logs/$name.bench.json" --out "$OUT/${DAY}_${gpu}_$name.json" >"$logs/$name.table.txt" 2>&1 \
      && tail -30 "$logs/$name.table.txt"
  done
  timeout "$(left 300)" $PY -m pytest tests/test_kernels_*.py tests/test_csrc_sm90.py tests/test_attention.py -q \
    -p no:cacheprovider -rs --tb=short -n "$TEST_WORKERS" >"$logs/gpu_tests.log" 2>&1
  echo "CUDA tests: exit $? at ${SECONDS}s"; grep -E "^(FAILED|ERROR)|passed|failed" "$logs/gpu_tests.log" | tail -15
  show_failures
  tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$logs"
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(check kernels attention train settings)
for s in "${steps[@]}"; do
  case $s in
    check|kernels|attention|train|settings|quick) echo "== $s"; "step_$s" ;;
    *) echo "unknown step '$s' (check | kernels | attention | train | settings | quick)"; exit 2 ;;
  esac
done
