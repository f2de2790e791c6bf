#!/usr/bin/env bash
# Re-create .whl/ (git-ignored) from scratch: the wheels that the GPU machine
# lacks (see /work/.library/device/KINDS.md, "Python packages already there").
# Run here, from the repo root, with network access to PyPI:
#     bash tests/gpu/fetch_wheels.sh
# Target: x86_64, CPython 3.12, torch 2.11+cu130 (the device image).
# TORCH_PY: a python with torch importable, needed to build DeepSpeed's wheel
# (default .venv/bin/python; it is only read, nothing is installed into it).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
TORCH_PY=${TORCH_PY:-.venv/bin/python}
W=.whl
rm -rf "$W" && mkdir -p "$W"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude

PLAT=()
for p in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
         manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLAT+=(--platform "${p}_x86_64")
done
PLAT+=(--platform any)

# One version of each; the pins are the versions the project's .venv resolved.
PKGS=(
  # quantisation / config / launch
  bitsandbytes==0.50.2
  hydra-core==1.3.8
  omegaconf==2.3.1
  hqq==0.2.8.post1            # sdist only, built below
  termcolor==3.3.0            # hqq
  liger-kernel==0.8.5
  # the data layer (trainer/data): datasets and the two it needs that the device lacks (xxhash, fsspec,
  # pandas, huggingface-hub, pyarrow are there). 4.3.0, not CI's 5.2.0: 5.x needs pyarrow>=24, newer than the
  # device's; 4.3.0 is the version unsloth ran with there (pyproject allows datasets>=3.0).
  datasets==4.3.0
  dill==0.4.0
  multiprocess==0.70.18
  # deepspeed's deps missing on the device (einops, msgpack, ninja, psutil,
  # py-cpuinfo, numpy, tqdm, packaging are there)
  hjson==3.1.0
  pydantic==2.14.3
  pydantic_core==2.50.4
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing_extensions==4.16.0   # pydantic needs >=4.16; device version unknown
  # wandb and its deps missing on the device (click, protobuf, pyyaml,
  # requests, xxhash, anyio, httpx are there)
  wandb==0.31.0
  platformdirs==4.14.7
  cwevals==0.0.1b1
  distro==1.9.0
  sniffio==1.3.1
  opentelemetry-api==1.45.2
  opentelemetry-sdk==1.45.2
  opentelemetry-semantic-conventions==0.66b2
  opentelemetry-proto==1.45.2
  opentelemetry-exporter-otlp-proto-http==1.45.2
  opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-exporter-http-transport==0.66b2
  opentelemetry-exporter-otlp-common==0.66b2
  googleapis-common-protos==1.76.0
)
for spec in "${PKGS[@]}"; do
  case "$spec" in hqq==*) continue;; esac
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLAT[@]}" -d "$W" "$spec"
done

# sdist-only packages: build pure-python wheels here.
python3 -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w "$W"
python3 -m pip wheel -q --no-deps hqq==0.2.8.post1 -w "$W"
DS_BUILD_OPS=0 "$TORCH_PY" -m pip wheel -q --no-deps --no-build-isolation \
  deepspeed==0.19.8 -w "$W"

# bitsandbytes ships one 20+ MB library per CUDA/ROCm/XPU version (43 MB
# wheel). The device's torch is cu130: keep only the cuda130 and cpu libraries
# (about 2 MB) and drop the others' lines from RECORD; other hashes unchanged.
python3 - "$W" <<'EOF'
import glob, os, re, sys, zipfile
keep = {"libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so"}
for path in glob.glob(os.path.join(sys.argv[1], "bitsandbytes-*.whl")):
    tmp = path + ".tmp"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        drop = {n for n in src.namelist()
                if re.fullmatch(r"bitsandbytes/libbitsandbytes_\w+\.so", n)
                and os.path.basename(n) not in keep}
        for info in src.infolist():
            if info.filename in drop:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(l for l in lines if l.split(",", 1)[0] not in drop).encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    os.replace(tmp, path)
    print(f"slimmed {os.path.basename(path)}: dropped {len(drop)} libraries")
EOF

# Checks: one version per package, wheels usable on cp312 x86_64, total size.
python3 - "$W" <<'EOF'
import collections, os, sys
d = sys.argv[1]
names = collections.Counter()
bad = []
for f in sorted(os.listdir(d)):
    parts = f[:-4].split("-")
    names[parts[0].lower().replace("_", "-")] += 1
    py, abi, plat = parts[-3:]
    ok_py = any(t in ("py3", "py312", "cp312") for t in py.split("."))
    ok_plat = plat == "any" or all("x86_64" in p for p in plat.split("."))
    if not (ok_py and ok_plat and abi in ("none", "cp312", "abi3")):
        bad.append(f)
dups = [n for n, c in names.items() if c > 1]
total = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
print(f"{len(names)} wheels, {total / 2**20:.1f} MiB; duplicates: {dups or 'none'}; incompatible: {bad or 'none'}")
sys.exit(1 if dups or bad else 0)
EOF
