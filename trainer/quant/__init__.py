"""Quantization backends: one module each, owning its facts (bits, knobs), rules, loader, preflight and install line.

Importing this package must stay cheap and torch-free: the validator and the matrix read the rules on a login
node. Each backend's loader imports its libraries inside the function that needs them. Adding a backend: one
module in trainer/quant/ that builds a Backend (trainer/quant/base.py), imported and listed below, plus one
YAML file in conf/quant/.
"""

from __future__ import annotations

from typing import Any, Dict, List

from trainer.quant import aqlm, awq, bnb, eetq, gptq, hqq, none, ptq
from trainer.quant.base import Backend, Requirement
from trainer.rules import method

BACKENDS: List[Backend] = [none.BACKEND, bnb.BACKEND, hqq.BACKEND, eetq.BACKEND, gptq.BACKEND, awq.BACKEND,
                           aqlm.BACKEND, *ptq.BACKENDS]
_BY_METHOD: Dict[str, Backend] = {b.method: b for b in BACKENDS}


def backends() -> List[Backend]:
    return list(BACKENDS)


def backend_for(method_name: str) -> Backend:
    return _BY_METHOD[method_name]


def trains_quantized(cfg: Any) -> bool:
    """True when the base weights stay quantized during training (FP8/MXFP4 are dequantized on load)."""
    return method(cfg) != "none" and backend_for(method(cfg)).trains_quantized


__all__ = ["BACKENDS", "Backend", "Requirement", "backend_for", "backends", "trains_quantized"]
