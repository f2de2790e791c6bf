#!/usr/bin/env bash
# On the GPU machine, in one call: install the carried wheels, then run every gpu-marked test.
#   device run, carry [".whl"]:  bash tests/gpu/run_gpu_tests.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck disable=SC1091
source tests/gpu/install_on_device.sh || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -m gpu tests -q -p no:cacheprovider -o addopts="" "$@" 2>&1 | tee "${OUT:-/tmp}/gpu-tests.log"
exit "${PIPESTATUS[0]}"
