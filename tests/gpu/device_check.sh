#!/usr/bin/env bash
# On the GPU machine, in one call (carry [".whl"]):  bash tests/gpu/device_check.sh
# Two checks side by side, each with its own log under $OUT:
#   gpu.log  every gpu-marked test on the GPU (tests/gpu/README.md)
#   cpu.log  the CPU-kernel-sensitive CPU tests on this host's CPU (an Intel Xeon with AVX-512 and AMX: the kind
#            of CPU where bitsandbytes repacked 4-bit weights and gptqmodel picked inference-only kernels), with the
#            GPU hidden, on the CPU's own kernels and capped at AVX2 (tests/conftest.py cpu_paths)
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck disable=SC1091
source tests/gpu/install_on_device.sh || exit 1
out="${OUT:-/tmp/out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "cpu: $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) cores"
echo "cpu flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx512|amx)' | sort -u | tr '\n' ' ')"
python3 -c 'import torch; print("torch cpu capability", torch.backends.cpu.get_cpu_capability())'
export PYTHONUNBUFFERED=1 QFORGE_CACHE=/tmp/qforge-cache

( timeout "${GPU_TIMEOUT:-500}" python3 -m pytest -m gpu tests -q -p no:cacheprovider -o addopts="" -x > "$out/gpu.log" 2>&1
  echo "gpu tests exit $?" >> "$out/gpu.log" ) &
gpu=$!
( CUDA_VISIBLE_DEVICES="" timeout "${CPU_TIMEOUT:-480}" python3 -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_cpu_kernels.py tests/test_strategies.py tests/test_resume.py \
    -k "bnb4 or avx2 or kernels or layout or resume" > "$out/cpu.log" 2>&1
  echo "cpu tests exit $?" >> "$out/cpu.log" ) &
cpu=$!
wait "$gpu" "$cpu"
tail -n 25 "$out/gpu.log"
echo "-----"
tail -n 25 "$out/cpu.log"
