# shellcheck shell=bash
# On the GPU machine, from the repo root, with .whl carried:
#     source tests/gpu/install_on_device.sh && python -m pytest -m gpu tests ...
# Installs the carried wheels (.whl/, made by tests/gpu/fetch_wheels.sh) into
# /tmp/site, puts /tmp/site and the repo on PYTHONPATH in the calling shell,
# and prints one line of versions. Sourceable: no `set -e`, no `exit`.

_qf_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

if ! ls "$_qf_root"/.whl/*.whl >/dev/null 2>&1; then
  echo "install_on_device: no wheels in $_qf_root/.whl (carry [\".whl\"])" >&2
  return 1 2>/dev/null || exit 1
fi

# Installed once per machine: scripts that each source this file can run side by side.
_qf_stamp="/tmp/site/.qforge-wheels-$(ls "$_qf_root"/.whl/*.whl | sha256sum | cut -c1-16)"
if [ ! -f "$_qf_stamp" ]; then
  if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site "$_qf_root"/.whl/*.whl; then
    echo "install_on_device: pip install failed" >&2
    return 1 2>/dev/null || exit 1
  fi
  touch "$_qf_stamp"
fi
unset _qf_stamp

export PYTHONPATH="/tmp/site:$_qf_root${PYTHONPATH:+:$PYTHONPATH}"
# Nothing outside the machine can be reached: no hub downloads, no wandb sync.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export WANDB_MODE="${WANDB_MODE:-disabled}"

python3 - <<'EOF'
import importlib, sys
out = [f"python {sys.version.split()[0]}"]
for mod in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "hydra",
            "omegaconf", "deepspeed", "hqq", "liger_kernel", "pydantic",
            "google.protobuf", "wandb"):
    try:
        m = importlib.import_module(mod)
        v = getattr(m, "__version__", None)
        if v is None:
            from importlib.metadata import version
            v = version({"hqq": "hqq", "liger_kernel": "liger-kernel",
                         "google.protobuf": "protobuf"}.get(mod, mod))
        out.append(f"{mod} {v}")
    except Exception as e:  # report, keep going
        out.append(f"{mod} ERR({type(e).__name__}: {str(e)[:80]})")
try:
    import torch
    out.append(f"cuda_devices {torch.cuda.device_count()}")
except Exception as e:
    out.append(f"cuda_devices ERR({e})")
print("versions: " + ", ".join(out), flush=True)
EOF
unset _qf_root
