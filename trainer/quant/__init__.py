"""Quantization backends: one module each, owning its rules, its loader, its preflight and its install line.

Importing this package must stay cheap and torch-free: the validator and the matrix read the rules
on a login node. Each backend's loader imports its libraries inside the function that needs them.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from trainer.rules import Rule


@dataclass(frozen=True)
class Requirement:
    """A package a backend needs at run time, with the version floor and the line that installs it."""

    module: str  # the import name
    distribution: str  # the name pip knows
    minimum: Optional[str] = None
    install: str = ""
    needs_gpu: bool = False


@dataclass(frozen=True)
class Backend:
    method: str
    summary: str
    bits: Tuple[int, ...]
    pre_quantized: bool  # loads a checkpoint somebody quantized, rather than quantizing on load
    trains_quantized: bool  # False where weights are dequantized on load (FP8, MXFP4)
    rules: List[Rule] = field(default_factory=list)
    requirements: Callable[[Any], List[Requirement]] = lambda cfg: []
    # "module:function" taking (cfg, model_kwargs) and returning the loaded model; imported lazily.
    loader: str = ""
    default_bits: Optional[int] = None

    def load(self, *args: Any, **kwargs: Any) -> Any:
        module_name, function_name = self.loader.split(":")
        return getattr(importlib.import_module(module_name), function_name)(*args, **kwargs)


_MODULES = ("none", "bnb", "hqq", "eetq", "gptq", "awq", "aqlm", "ptq")


@functools.lru_cache(maxsize=1)
def backends() -> List[Backend]:
    found: List[Backend] = []
    for name in _MODULES:
        module = importlib.import_module(f"trainer.quant.{name}")
        found.extend(getattr(module, "BACKENDS", [getattr(module, "BACKEND", None)]))
    return [b for b in found if b is not None]


@functools.cache
def backend_for(method: str) -> Backend:
    table: Dict[str, Backend] = {b.method: b for b in backends()}
    return table[method]
