# shellcheck shell=bash
# On the lent GPU machine (carry [".whl"], and ".whl-unsloth" for --sides ...,unsloth):
#     bash bench/device.sh <bench.run arguments>
# Installs the carried wheels, pins one GPU, says which attention/kernel packages exist, runs the bench.
source tests/gpu/install_on_device.sh || exit 1
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}" TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
df -h /dev/shm /tmp | tail -n +2
python3 - <<'PY'
import importlib.util
for mod in ("flash_attn", "flash_attn_interface", "kernels", "liger_kernel", "triton"):
    print(f"probe: {mod} {'present' if importlib.util.find_spec(mod) else 'absent'}")
try:
    import torch
    from liger_kernel.ops import LigerRMSNormFunction  # noqa: F401  compiles nothing yet; import check only
    print("probe: liger ops import ok; sdpa backends flash", torch.backends.cuda.flash_sdp_enabled(),
          "mem_efficient", torch.backends.cuda.mem_efficient_sdp_enabled(), "cudnn", torch.backends.cuda.cudnn_sdp_enabled())
except Exception as err:  # report and go on: the bench falls back to torch kernels
    print("probe: liger import failed:", err)
PY
# unsloth's packages (carried as .whl-unsloth, tests/gpu/fetch_unsloth_wheels.sh) go into a folder of their own
# that bench/run.py puts on the unsloth side's path alone.
if ls .whl-unsloth/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-unsloth \
      .whl-unsloth/*.whl && export QFORGE_BENCH_UNSLOTH_SITE=/tmp/site-unsloth
fi
python3 -m bench.run --out "${OUT:-bench-out}" "$@"
