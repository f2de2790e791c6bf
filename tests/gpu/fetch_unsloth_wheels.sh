#!/usr/bin/env bash
# Re-create .whl-unsloth/ (git-ignored): unsloth and what it needs that the GPU machine lacks, for the bench's
# unsloth side (bench/unsloth_side.py). Kept apart from .whl/ so that only that side's process sees them
# (bench/device.sh installs them into their own folder). Run here, from the repo root, with PyPI access:
#     bash tests/gpu/fetch_unsloth_wheels.sh
# then carry both: [".whl", ".whl-unsloth"]. Target: x86_64, CPython 3.12, torch 2.11+cu130, transformers 5.17,
# datasets 4.3 and bitsandbytes from .whl/ (trl 1.15 asks for datasets>=4.7 but trains with 4.3 there; installed
# without dependency resolution).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
W=.whl-unsloth
rm -rf "$W" && mkdir -p "$W"
grep -qxF '/.whl-unsloth/' .git/info/exclude 2>/dev/null || echo /.whl-unsloth/ >> .git/info/exclude

PKGS=(
  unsloth==2026.10.9
  unsloth_zoo==2026.10.9
  trl==1.15.0                 # unsloth pins trl<=1.15.0
  torchao==0.18.0
  cut_cross_entropy==25.1.1
  tyro==1.0.17
  docstring_parser==0.18.0    # tyro
  shtab==1.13.0               # tyro
  typeguard==4.6.1            # tyro
  hf_transfer==0.1.9
  msgspec==0.23.0
  json5==0.17.3
  structlog==26.1.0
  nest_asyncio==1.6.0
)
for spec in "${PKGS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$W" "$spec"
done

# unsloth's wheel carries its desktop app (studio/, 26 MB of its 28 MB) that training never imports: drop it
# and its RECORD lines so the carried tree stays under the 64 MiB limit.
python3 - "$W" <<'PY'
import glob, os, sys, zipfile
for path in glob.glob(os.path.join(sys.argv[1], "unsloth-*.whl")):
    tmp = path + ".tmp"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.startswith("studio/"):
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if not line.startswith("studio/")).encode()
            if info.filename.endswith(".dist-info/top_level.txt"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if line.strip() != "studio").encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    os.replace(tmp, path)
total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(sys.argv[1], "*.whl")))
print(f"{len(os.listdir(sys.argv[1]))} wheels, {total / 2**20:.1f} MiB")
PY
