"""Which layers "all-linear" means on a model whose linear layers are not nn.Linear any more.

peft resolves target_modules="all-linear" to nn.Linear (and Conv1D) subclasses only. HQQLinear,
gptqmodel's kernels and AQLM's QuantizedLinear are plain nn.Modules, so peft would find nothing.
Loaders of such backends record the leaf names of the decoder's quantized linear layers on the
model, and trainer.adapters.attach uses those names in place of "all-linear". Like peft, the
output layer (lm_head) is never a target: it lives outside the decoder.
"""

from __future__ import annotations

from typing import Any, List, Optional

LINEAR_TARGETS_ATTR = "qforge_linear_targets"


def decoder_linear_names(model: Any) -> List[str]:
    """Leaf names of the decoder's linear-like layers, found by class name as LLaMA-Factory does."""
    names = set()
    for name, module in model.get_decoder().named_modules():
        if name and "Linear" in type(module).__name__ and not list(module.children()):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def mark_linear_targets(model: Any) -> Any:
    setattr(model, LINEAR_TARGETS_ATTR, decoder_linear_names(model))
    return model


def linear_targets(model: Any) -> Optional[List[str]]:
    """The recorded names, or None where peft's own "all-linear" works."""
    return getattr(model, LINEAR_TARGETS_ATTR, None)
