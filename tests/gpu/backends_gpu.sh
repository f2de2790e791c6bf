# shellcheck shell=bash
# The GPU measurements behind docs/backends.md, in one device call (run from the repo root):
#     carry [".whl"];  command: bash tests/gpu/backends_gpu.sh
# .whl/quant/ holds the backend wheels the device image lacks beyond tests/gpu/fetch_wheels.sh's
# (aqlm: pure Python). gptqmodel cannot travel: its dependency pypcre is a C extension published
# only as an sdist, and the device has no compiler toolchain for it nor any internet.
set -uo pipefail
source tests/gpu/install_on_device.sh || exit 1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/quant/*.whl || exit 1
export CUDA_VISIBLE_DEVICES=0 QFORGE_CACHE=/tmp/qforge-cache
out="${OUT:-/tmp/out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# The table: every backend through qforge's own loaders, one process, rows written as they finish.
timeout 250 python3 tests/gpu/backends_gpu.py --out "$out" 2>&1 | grep -v "Loading weights" | tee "$out/backends.log"
# And the whole framework once on the GPU: HQQ 4-bit LoRA through train.py (HF Trainer, bf16).
timeout 80 python3 train.py quant=hqq quant.bits=4 train.max_steps=8 train.logging_steps=2 do_eval=false \
    logger=none "output_root=$out/runs" 2>&1 | grep -v "Loading weights" | tail -5 | tee "$out/train_hqq.log"
find "$out/runs" -name metrics.json -exec cp {} "$out/train_hqq_metrics.json" \; 2>/dev/null
true
