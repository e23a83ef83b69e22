#!/usr/bin/env bash
# The GPU measurements of issues 4 and 7 in one call of about 8 minutes (see docs/benchmarks.md).
#
# Prepared on a CPU machine; run where a CUDA GPU is (the device tool's `run`, one call):
#
#   echo /.whl/ >> .git/info/exclude            # once, here: the GPU image lacks MONAI
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl monai==1.6.1
#   run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=560)
#
# Everything the scripts print and their JSON land in $OUT (default runs/gpu). Each step has its
# own time limit, so one that hangs cannot take the others' time. `bash benchmarks/gpu.sh --quick`
# is the smoke check of the same commands with narrow nets (runs on a CPU too: DEVICE=cpu).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
quick=()
[[ "${1:-}" == "--quick" ]] && quick=(--quick)

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$OUT/machine.txt"

# Issue 7: ms per 512² image, Mpx/s on 2048² and 8192², TFLOP/s against the bf16 matrix product,
# peak memory, MONAI sliding_window_inference; eager and compiled with CUDA graphs.
timeout 300 python3 benchmarks/predict.py --device "$DEVICE" --precision bfloat16 --compile reduce-overhead \
    --batch-size 8 --repeats 5 "${quick[@]}" --json "$OUT/predict.json" 2>&1 | tee "$OUT/predict.log"

# Issue 4: steps per second of the paper recipe (data pipeline on and off) against the bare step and MONAI.
timeout 180 python3 benchmarks/train.py --device "$DEVICE" --precision bfloat16 --compile --channels-last \
    --steps 30 --warmup 10 "${quick[@]}" 2>&1 | tee "$OUT/train.log"
