"""train.offload_activations: a checkpointed decoder layer keeps its input in pinned host memory, not on the GPU.

With every layer checkpointed, what a step keeps for backward is each layer's input (tokens x hidden x 2 bytes:
64 MiB per layer of an 8B model at 8k tokens, 2 GiB over 32 layers). Here those inputs are copied to pinned
host memory on a side stream as the forward pass makes them (the GPU copy is freed once the copy has read it),
and brought back during backward one layer ahead of the recompute that needs them, so the copies overlap
compute. It is the idea behind unsloth's offloaded gradient checkpointing, done with torch's saved-tensor hooks
around each layer's checkpoint call: torch.utils.checkpoint (non-reentrant) saves exactly the layer's tensor
arguments through the hooks active when it is called (torch 2.13: one saved tensor per layer, its hidden
states; the layer's keyword arguments, rotary cos/sin and masks, are shared by every layer and stay put).

Applied by a TrainerCallback after the Trainer has switched checkpointing on (trainer/speed.py callbacks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

log = logging.getLogger(__name__)

# Smaller saved tensors are not worth a copy each way.
MIN_BYTES = 1 << 20


@dataclass
class _Offloaded:
    """One layer input in host memory, and its way back."""

    host: Any  # the pinned copy
    device: Any
    index: int  # the order the forward pass saved it in; backward unpacks in reverse
    copied: Any = None  # CUDA event: the copy to the host is done
    back: Any = None  # the copy on its way back (prefetched), until the recompute takes it
    ready: Any = None  # CUDA event: `back` has arrived
    unpacked: bool = False


class LayerInputOffloader:
    """Saved-tensor hooks that move checkpointed layer inputs to the host and back.

    simulate=True (tests on CPU only): tensors are "offloaded" to a separate CPU copy, without streams, so the
    order and values of what is packed and unpacked can be checked where there is no GPU.
    """

    def __init__(self, min_bytes: int = MIN_BYTES, simulate: bool = False) -> None:
        import torch

        self.min_bytes = min_bytes
        self.simulate = simulate
        self.cuda = torch.cuda.is_available() and not simulate
        self.stream = torch.cuda.Stream() if self.cuda else None
        self.saved: List[_Offloaded] = []
        self.packed_bytes = 0  # of the current forward pass: what stayed off the GPU

    def wrap(self, checkpoint_fn: Callable[..., Any]) -> Callable[..., Any]:
        """A layer's _gradient_checkpointing_func, with this offloader's hooks around the checkpoint call."""
        import torch

        def offloaded(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                return checkpoint_fn(function, *args, **kwargs)

        return offloaded

    def pack(self, tensor: Any) -> Any:
        import torch

        nbytes = tensor.numel() * tensor.element_size()
        if nbytes < self.min_bytes or not (tensor.is_cuda or self.simulate):
            return tensor
        if self.saved and all(s.unpacked for s in self.saved):
            self.saved, self.packed_bytes = [], 0  # the previous step's backward is done
        if not self.cuda:
            item = _Offloaded(host=tensor.detach().clone(), device=tensor.device, index=len(self.saved))
        else:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream())  # the tensor is written
            with torch.cuda.stream(self.stream):
                host.copy_(tensor, non_blocking=True)
            # The caching allocator must not hand the GPU memory to anyone before the side stream has read it.
            tensor.record_stream(self.stream)
            item = _Offloaded(host=host, device=tensor.device, index=len(self.saved),
                              copied=self.stream.record_event())
        self.saved.append(item)
        self.packed_bytes += nbytes
        return item

    def unpack(self, item: Any) -> Any:
        if not isinstance(item, _Offloaded):
            return item
        item.unpacked = True
        if not self.cuda:
            value = item.host.clone()
        else:
            import torch

            if item.back is None:
                self._fetch(item)
            current = torch.cuda.current_stream()
            current.wait_event(item.ready)
            value, item.back = item.back, None
            value.record_stream(current)
        # Backward recomputes the layers last to first: bring the one before this back while this one computes.
        if self.cuda and item.index > 0:
            previous = self.saved[item.index - 1]
            if previous.back is None and not previous.unpacked:
                self._fetch(previous)
        return value

    def _fetch(self, item: _Offloaded) -> None:
        import torch

        self.stream.wait_event(item.copied)
        with torch.cuda.stream(self.stream):
            item.back = item.host.to(item.device, non_blocking=True)
        item.ready = self.stream.record_event()


def offload_checkpointed_layers(model: Any, offloader: Optional[LayerInputOffloader] = None) -> int:
    """Wrap the checkpoint function of every decoder layer that checkpoints; returns how many."""
    offloader = offloader or LayerInputOffloader()
    wrapped = 0
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and type(module).__name__.endswith("DecoderLayer") \
                and getattr(module, "_gradient_checkpointing_func", None) is not None \
                and not getattr(module, "_qforge_offloaded", False):
            module._gradient_checkpointing_func = offloader.wrap(module._gradient_checkpointing_func)
            module._qforge_offloaded = True
            wrapped += 1
    return wrapped
