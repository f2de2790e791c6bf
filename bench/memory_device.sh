# shellcheck shell=bash
# The memory model's GPU benchmark in one device call (one H200; carry [".whl"], see tests/gpu/README.md):
#     QFORGE_COMMIT=<the commit you sent> bash bench/memory_device.sh [bench.memory_bench arguments]
# Installs the carried wheels, pins one GPU and runs every cell of bench/memory_bench.py inside DEADLINE seconds
# (default 480, so the call ends well inside its 10 minutes), then renders the table. Leaves in $OUT:
# memory.json (the results; render again with python -m bench.memory_bench --report), memory.md, memory.log.
source tests/gpu/install_on_device.sh || exit 1
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
out="${OUT:-/tmp/out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# bitsandbytes 8-bit logs one line per matmul call (inputs cast to fp16); transformers a bar per load.
python3 -m bench.memory_bench --out "$out/memory.json" --steps 2 --deadline "${DEADLINE:-480}" "$@" 2>&1 \
    | grep --line-buffered -v -e "MatMul8bitLt: inputs will be cast" -e "Loading weights" > "$out/memory.log"
grep "^memory_bench:" "$out/memory.log"
python3 -m bench.memory_bench --report "$out/memory.json" | tee "$out/memory.md"
