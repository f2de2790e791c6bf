"""train.compile: each decoder layer's training forward through torch.compile (regional compilation).

One compiled function of the layer class's forward serves every layer: the layers differ only in their
weights, which dynamo reads as inputs, so compile time does not grow with depth and the graph is the same
for layer 1 and layer 80. Only the training forward (module in train mode, grad enabled; activation
checkpointing's recompute is one) is compiled: evaluation and generation run the layer eagerly, so a KV
cache or an eval batch's shapes never trigger a recompile. Inductor's caches live in
TORCHINDUCTOR_CACHE_DIR, by default ~/.cache/qforge/torchinductor (not /tmp, which clusters wipe), so a
second run of the same shapes reuses the kernels instead of generating them again.

The fused LoRA branch (lora_fused.py) is not used under compile: its Python-side recompute state would
break the graph, and inductor fuses peft's own branch (scale, add) and picks what to recompute itself.

What the compiled layer keeps for backward: AOTAutograd's min-cut partitioner is told to recompute every cheap
pointwise op it can (RECOMPUTE), not only the ones next to their use. By default it keeps, among others, peft's
fp32 copies of each LoRA input (the adapters are fp32) and the norms' fp32 intermediates, which doubles what a
layer saves (25 -> 12.5 layer inputs' worth on the test model's shape); recomputing them in backward is
elementwise work fused into kernels backward runs anyway. No matmul, attention or dequantize is recomputed
(those stay banned).
"""

from __future__ import annotations

import logging
import os
import time
import types
from pathlib import Path
from typing import Any, Callable, Dict

from trainer.offload import decoder_layers

log = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"

# torch._functorch.config settings for the partition of each compiled layer into forward and backward: lift the
# bans that keep a cheap op's output saved when it is used far from where it is made, ends a long fusible chain,
# or is materialized in backward anyway. The allowlist ban stays: only pointwise ops and views are recomputed.
RECOMPUTE = {
    "ban_recompute_used_far_apart": False,
    "ban_recompute_long_fusible_chains": False,
    "ban_recompute_materialized_backward": False,
}


def cache_dir() -> Path:
    """Where inductor keeps compiled kernels: $TORCHINDUCTOR_CACHE_DIR, else under the user's cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qforge" / "torchinductor"


def _inductor(graph: Any, example_inputs: Any) -> Any:
    """Inductor, with RECOMPUTE applied while AOTAutograd partitions the layer (at compile time only, so the
    settings cost nothing per call and do not leak to other torch.compile users in the process)."""
    import torch._functorch.config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    with functorch_config.patch(**RECOMPUTE):
        return compile_fx(graph, example_inputs)


def _training_forward(compiled: Callable[..., Any], eager: Callable[..., Any]) -> Callable[..., Any]:
    import torch  # here, not per call: this runs for every layer of every step

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.training and torch.is_grad_enabled():
            return compiled(self, *args, **kwargs)
        return eager(*args, **kwargs)

    return forward


def install(model: Any) -> int:
    """Route every decoder layer's training forward through one compiled function per layer class.

    A layer whose forward something else already replaced on the instance (a hook library's wrapper) is left
    eager: compiling the class's forward would skip that wrapper.
    """
    import torch

    os.environ.setdefault(CACHE_ENV, str(cache_dir()))
    compiled: Dict[type, Callable[..., Any]] = {}
    layers = decoder_layers(model)
    plain = [layer for layer in layers if "forward" not in vars(layer)]
    wrapped = [layer for layer in layers if "forward" in vars(layer)]
    for layer in plain:
        cls = type(layer)
        if cls not in compiled:
            compiled[cls] = torch.compile(cls.forward, backend=_inductor)
        layer.forward = types.MethodType(_training_forward(compiled[cls], layer.forward), layer)
    if plain:
        log.info("torch.compile: %d decoder layers (%s) share one compiled forward; inductor cache %s",
                 len(plain), ", ".join(sorted(c.__name__ for c in compiled)), os.environ[CACHE_ENV])
    if wrapped:
        log.warning("torch.compile: %d decoder layers stay eager: their forward is already wrapped by %s",
                    len(wrapped), type(vars(wrapped[0])["forward"]).__name__)
    return len(plain)


def report_callback() -> Any:
    """Logs what compiling cost on the first training step, apart from the steps after it."""
    from transformers import TrainerCallback

    class CompileReport(TrainerCallback):
        def __init__(self) -> None:
            self.started = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 0:
                self.started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step != 1:
                return
            import torch
            from torch._dynamo.utils import counters

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step = time.perf_counter() - self.started
            graphs = int(counters["stats"]["unique_graphs"])
            breaks = sum(counters["graph_break"].values())
            hits = int(counters["inductor"]["fxgraph_cache_hit"])
            misses = int(counters["inductor"]["fxgraph_cache_miss"])
            log.info("torch.compile: first step %.1f s with compiling; %d graphs, %d graph breaks, "
                     "inductor cache %d hits, %d misses", step, graphs, breaks, hits, misses)

    return CompileReport()
