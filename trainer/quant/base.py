"""What a quant backend is (Backend) and what it needs installed (Requirement); the backends build these."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from trainer.rules import Rule, error, method

# quant.* keys a backend may take; `method` and `compute_dtype` every backend takes.
KNOBS = ("bits", "quant_type", "double_quant", "group_size")
# The schema's defaults (trainer/schema.py QuantConfig): a knob left at its default says nothing.
KNOB_DEFAULTS: Dict[str, Any] = {"bits": None, "quant_type": "nf4", "double_quant": True, "group_size": 64}


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
    label: str  # how messages name it ("bitsandbytes", "HQQ")
    summary: str
    bits: Tuple[int, ...]  # the bit widths it takes (empty: it takes none)
    pre_quantized: bool  # loads a checkpoint somebody quantized, rather than quantizing on load
    trains_quantized: bool  # False where weights are dequantized on load (FP8, MXFP4)
    # "module:function" taking (path, QuantSpec, from_pretrained kwargs) and returning the model; imported lazily.
    loader: str
    knobs: Tuple[str, ...] = ()  # the quant.* keys it reads besides bits
    rules: List[Rule] = field(default_factory=list)
    requirements: Callable[[Any], List[Requirement]] = lambda cfg: []
    # Plan time: the loader's real arguments from the composition, the device and the compute dtype.
    load_kwargs: Callable[[Any, str, str], Dict[str, Any]] = lambda cfg, device, dtype: {}

    def load(self, path: str, spec: Any, model_kwargs: Dict[str, Any]) -> Any:
        module_name, function_name = self.loader.split(":")
        return getattr(importlib.import_module(module_name), function_name)(path, spec, model_kwargs)

    def all_rules(self) -> List[Rule]:
        return [*self.knob_rules(), *self.rules]

    def knob_rules(self) -> List[Rule]:
        """Refuse a bits value it does not take, and any knob it does not read (a key must do something)."""
        label = self.label
        listed = "/".join(str(b) for b in self.bits)
        found = [error(
            f"{self.method}.bits", ["quant"],
            lambda cfg: method(cfg) == self.method and (cfg.quant.bits not in self.bits if self.bits
                                                        else cfg.quant.bits is not None),
            f"{label} quantizes to {listed} bits, not quant.bits={{cfg.quant.bits}}." if self.bits
            else f"{label} takes no bit width, but quant.bits={{cfg.quant.bits}}.",
            f"set quant.bits to one of {listed}." if self.bits else "set quant.bits=null.",
        )]
        unread = [k for k in KNOBS if k != "bits" and k not in self.knobs]
        if unread:
            found.append(error(
                f"{self.method}.knobs", ["quant"],
                lambda cfg: method(cfg) == self.method and bool(_set_knobs(cfg, unread)),
                f"{{knobs}} {{do}} nothing with quant={self.method}: {label} has no such setting.",
                "remove {knobs} from the command line or the experiment file.",
                details=lambda cfg: {"knobs": ", ".join(_set_knobs(cfg, unread)),
                                     "do": "does" if len(_set_knobs(cfg, unread)) == 1 else "do"},
            ))
        return found


def _set_knobs(cfg: Any, keys: List[str]) -> List[str]:
    def value(key: str) -> Any:
        v = cfg.quant[key]
        return v.value if hasattr(v, "value") else v

    return [f"quant.{k}={value(k)}" for k in keys if value(k) != KNOB_DEFAULTS[k]]
