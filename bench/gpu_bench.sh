#!/usr/bin/env bash
# GPU benchmark: the same table as `fluorosam bench`, for torch CUDA FP16 (+ CUDA graph encoder) and
# TensorRT FP16 where installed (either flavor: TensorRT 10/11 on any NVIDIA GPU, TensorRT-RTX on RTX-class
# ones; `build-engine` picks the one present), for the default model and a random-init `large` (448 px, Swin-L).
# Run from the repo root on a CUDA machine: bench/gpu_bench.sh [OUT_DIR]   (JSON files land in OUT_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results}
mkdir -p "$OUT"
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1
export FLUOROSAM_CACHE=${FLUOROSAM_CACHE:-$OUT/cache}

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
HAS_TRT=0
if "$PY" -c "
import sys
from engine.backends.tensorrt_backend import tensorrt_available
ok, why = tensorrt_available(); print('TensorRT:', why); sys.exit(0 if ok else 1)"; then HAS_TRT=1
else echo "TensorRT rows skipped"; fi

bench() {  # name, then `fluorosam bench` arguments
  local name=$1; shift
  echo; echo "=== $name ==="
  "$PY" -m fluorosam_ros.cli bench --quiet --iterations 50 --no-cpu-comparison --json "$OUT/$name.json" "$@"
}

DEFAULT_MODEL=$("$PY" -c "from fluorosam_common.paths import default_model_dir; print(default_model_dir())")
if [ -f "$DEFAULT_MODEL/model.json" ]; then
  bench default-torch-cuda --model "$DEFAULT_MODEL" --backend torch-cuda
  if [ "$HAS_TRT" = 1 ]; then
    "$PY" -m fluorosam_ros.cli export --model "$DEFAULT_MODEL" --out "$OUT/onnx-default"
    "$PY" -m fluorosam_ros.cli build-engine --onnx "$OUT/onnx-default" --fp16 --out "$DEFAULT_MODEL/tensorrt"
    bench default-tensorrt --model "$DEFAULT_MODEL" --backend tensorrt
  fi
else
  echo "no default model at $DEFAULT_MODEL: benchmarking a random-init tiny instead"
  bench tiny-random-torch-cuda --random-init tiny --backend torch-cuda
  if [ "$HAS_TRT" = 1 ]; then bench tiny-random-tensorrt --random-init tiny --backend tensorrt; fi
fi

# The paper's size: Swin-L at 448 px. Random init: latency depends on the architecture, not the weights.
# (The TensorRT backend exports and builds into $FLUOROSAM_CACHE on first use.)
bench large-random-torch-cuda --random-init large --backend torch-cuda
if [ "$HAS_TRT" = 1 ]; then bench large-random-tensorrt --random-init large --backend tensorrt; fi
echo; echo "JSON: $OUT"
