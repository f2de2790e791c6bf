"""train.offload_activations: what the decoder layers keep for backward lives in pinned host memory, not on the GPU.

Two kinds of layer, one mechanism (torch's saved-tensor hooks, a side CUDA stream, one layer of prefetch):
- a checkpointed layer keeps only its input (tokens x hidden x 2 bytes: 64 MiB per layer of an 8B model at 8k
  tokens). torch.utils.checkpoint (non-reentrant) saves exactly the layer's tensor arguments through the hooks
  active when it is called, so the hooks go around the layer's checkpoint call; backward recomputes the layer
  from the input brought back. This is the idea behind unsloth's offloaded gradient checkpointing.
- an un-checkpointed layer keeps everything its ops save (attention's q/k/v/output, the MLP's gate and up, the
  norms' inputs: ~0.7 GiB per layer of an 8B model at 8k tokens). The hooks go around the layer's forward and
  move all of it; backward needs no recompute, only the copy back. This trades a third of the layer's FLOPs for
  host-link traffic, which pays for as many layers as the link can carry while the others compute
  (train.checkpoint_layers sets how many layers recompute; with offload they are spread among the others, so that
  each copy overlaps a recomputing layer's work rather than queueing behind the last one).
- train.offload_layers=N offloads only N of the un-checkpointed layers, spread among them: the others keep their
  activations on the GPU (no copies, no recompute), which is fastest where memory allows; checkpoint_layers=auto
  picks the split.

Copies to the host start as the forward pass saves each tensor (the GPU copy is freed once the copy has read it);
the forward pass stalls the GPU, never the CPU, if the copies fall two layers behind. In backward, a layer's
tensors come back as a group, and the group before it is fetched while this one computes. The layer's keyword
arguments (rotary cos/sin, masks: shared by every layer), its parameters and small tensors stay where they are.

Applied by a TrainerCallback after the Trainer has switched checkpointing on (trainer/speed.py callbacks).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple, Union

log = logging.getLogger(__name__)

# Smaller saved tensors are not worth a copy each way.
MIN_BYTES = 1 << 20


@dataclass
class _Offloaded:
    """One saved tensor (or the storage several saved views share) in host memory, and its way back."""

    host: Any  # the pinned copy (flat when the tensor was contiguous)
    device: Any
    group: int  # the layer call that saved it, in forward order; backward unpacks groups in reverse
    source: int = 0  # the GPU storage it was copied from (its data_ptr), for inspection
    copied: Any = None  # CUDA event: the copy to the host is done
    back: Any = None  # the copy on its way back (prefetched), until the last user has it
    ready: Any = None  # CUDA event: `back` has arrived
    users: int = 0  # saved-tensor handles not yet unpacked
    unpacked: bool = False


@dataclass
class _Handle:
    """What autograd keeps instead of a saved tensor: its offloaded storage and the view to rebuild."""

    item: _Offloaded
    shape: tuple


@dataclass
class _Group:
    items: List[_Offloaded] = field(default_factory=list)
    fetched: bool = False
    copied: Any = None  # CUDA event after the group's last copy to the host


class ActivationOffloader:
    """Saved-tensor hooks that move what decoder layers save for backward to the host and back.

    simulate=True (tests on CPU only): tensors are "offloaded" to a separate CPU copy, without streams, so the
    order and values of what is packed and unpacked can be checked where there is no GPU.
    """

    def __init__(self, min_bytes: int = MIN_BYTES, simulate: bool = False) -> None:
        import torch

        self.min_bytes = min_bytes
        self.simulate = simulate
        self.cuda = torch.cuda.is_available() and not simulate
        self.stream = torch.cuda.Stream() if self.cuda else None
        self.groups: List[_Group] = []
        self.packed_bytes = 0  # of the current forward pass: what stayed off the GPU
        self._skip: Set[int] = set()  # storages of the current group that stay put (parameters, kwargs)
        # The current group's storages already copied, with the tensor they came from: holding it until the
        # group ends keeps its address from being reused by a new tensor that would match the same key.
        self._shared: Dict[tuple, Tuple[_Offloaded, Any]] = {}
        self._backward_seen = False
        self._frontier = 0  # the earliest group backward has reached

    @property
    def saved(self) -> List[_Offloaded]:
        """Every tensor offloaded in the current step, in the order the forward pass saved them."""
        return [item for group in self.groups for item in group.items]

    # ---- where the hooks go ----

    def wrap(self, checkpoint_fn: Callable[..., Any]) -> Callable[..., Any]:
        """A layer's _gradient_checkpointing_func, with this offloader's hooks around the checkpoint call."""

        def offloaded(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            with self._group(kwargs, None):
                return checkpoint_fn(function, *args, **kwargs)

        return offloaded

    def wrap_layer(self, module: Any) -> None:
        """An un-checkpointed layer: everything its forward saves for backward goes to the host."""
        import torch

        forward = module.forward

        def offloaded(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            with self._group(kwargs, module):
                return forward(*args, **kwargs)

        module.forward = offloaded

    @contextlib.contextmanager
    def _group(self, kwargs: Dict[str, Any], module: Any) -> Iterator[None]:
        import torch

        if self._backward_seen:  # a new forward pass: the previous step's tensors are done with
            self.groups, self.packed_bytes, self._backward_seen = [], 0, False
        if self.cuda and len(self.groups) >= 2 and self.groups[-2].copied is not None:
            # The copies fell two layers behind: let the GPU wait for them (the CPU goes on queueing work).
            torch.cuda.current_stream().wait_event(self.groups[-2].copied)
        self.groups.append(_Group())
        self._shared = {}
        self._skip = {t.untyped_storage().data_ptr() for t in _tensors(kwargs)}
        if module is not None:
            self._skip |= {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            group = self.groups[-1]
            if self.cuda and group.items:
                group.copied = self.stream.record_event()
            self._shared, self._skip = {}, set()

    # ---- the hooks ----

    def pack(self, tensor: Any) -> Any:
        import torch

        nbytes = tensor.numel() * tensor.element_size()
        if nbytes < self.min_bytes or not (tensor.is_cuda or self.simulate) or not self.groups:
            return tensor
        storage = tensor.untyped_storage().data_ptr()
        if storage in self._skip:
            return tensor
        contiguous = tensor.is_contiguous()
        if not contiguous and not _dense(tensor):
            return tensor  # overlapping or gappy strides: not worth a layout-preserving copy
        key = (storage, tensor.storage_offset(), tensor.numel(), tensor.dtype) if contiguous else \
            (storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        item = self._shared.get(key, (None, None))[0]
        if item is None:
            index = len(self.groups) - 1
            source = tensor.detach().reshape(-1) if contiguous else tensor.detach()
            if not self.cuda:
                item = _Offloaded(host=source.clone(), device=tensor.device, group=index, source=storage)
            else:
                host = torch.empty_strided(source.shape, source.stride(), dtype=tensor.dtype, pin_memory=True)
                self.stream.wait_stream(torch.cuda.current_stream())  # the tensor is written
                with torch.cuda.stream(self.stream):
                    host.copy_(source, non_blocking=True)
                # The caching allocator must not hand the GPU memory to anyone before the side stream has read it.
                tensor.record_stream(self.stream)
                item = _Offloaded(host=host, device=tensor.device, group=index, source=storage,
                                  copied=self.stream.record_event())
            self._shared[key] = (item, tensor)
            self.groups[-1].items.append(item)
            self.packed_bytes += nbytes
        item.users += 1
        return _Handle(item, tuple(tensor.shape))

    def unpack(self, handle: Any) -> Any:
        if not isinstance(handle, _Handle):
            return handle
        if not self._backward_seen:
            self._backward_seen, self._frontier = True, len(self.groups)
        item = handle.item
        item.unpacked = True
        if not self.cuda:
            value = item.host.clone()
        else:
            import torch

            group = self.groups[item.group]
            if not group.fetched:
                self._fetch(group)
            # Backward runs the layers last to first: what later layers fetched is no longer needed on the GPU,
            # and the layer before this one comes back while this one computes.
            if item.group < self._frontier:
                for later in self.groups[item.group + 1:self._frontier + 1]:
                    self._release(later)
                self._frontier = item.group
            if item.group > 0 and not self.groups[item.group - 1].fetched:
                self._fetch(self.groups[item.group - 1])
            if item.back is None:  # released earlier (an unusual backward order): fetch it again
                self._fetch_item(item)
            current = torch.cuda.current_stream()
            current.wait_event(item.ready)
            value = item.back
            value.record_stream(current)
        item.users -= 1
        if item.users <= 0:
            item.back = None
        return value.view(handle.shape) if value.shape != handle.shape else value

    def _fetch(self, group: _Group) -> None:
        group.fetched = True
        for item in group.items:
            if item.users > 0 and item.back is None:
                self._fetch_item(item)

    def _fetch_item(self, item: _Offloaded) -> None:
        import torch

        self.stream.wait_event(item.copied)
        with torch.cuda.stream(self.stream):
            item.back = item.host.to(item.device, non_blocking=True)
        item.ready = self.stream.record_event()

    @staticmethod
    def _release(group: _Group) -> None:
        for item in group.items:
            item.back = None


def _tensors(value: Any) -> Iterator[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _dense(tensor: Any) -> bool:
    """Whether the tensor's elements fill its storage span exactly once (a permutation of a contiguous layout)."""
    dims = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size > 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def decoder_layers(model: Any) -> List[Any]:
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def offload_checkpointed_layers(model: Any, offloader: Optional[ActivationOffloader] = None,
                                plain_layers: Union[bool, int] = False) -> int:
    """Put the hooks on every decoder layer that checkpoints and, plain_layers, on the un-checkpointed ones too
    (True: every one; a number N: N of them spread evenly among the others, which keep their activations on the
    GPU: each layer that copies nothing gives the host link a layer's compute to catch up); returns how many
    layers were wrapped."""
    offloader = offloader or ActivationOffloader()
    layers = decoder_layers(model)

    def checkpoints(module: Any) -> bool:
        return bool(getattr(module, "gradient_checkpointing", False)) \
            and getattr(module, "_gradient_checkpointing_func", None) is not None

    plain = [m for m in layers if not checkpoints(m)]
    moved = [True] * len(plain) if plain_layers is True else spread(int(plain_layers), len(plain))
    offloaded_plain = {id(m) for m, chosen in zip(plain, moved) if chosen}
    wrapped = 0
    for module in layers:
        if getattr(module, "_qforge_offloaded", False):
            continue
        if checkpoints(module):
            module._gradient_checkpointing_func = offloader.wrap(module._gradient_checkpointing_func)
        elif id(module) in offloaded_plain:
            offloader.wrap_layer(module)
        else:
            continue
        module._qforge_offloaded = True
        wrapped += 1
    return wrapped


def spread(keep: int, layers: int) -> List[bool]:
    """Which of `layers` layers checkpoint when `keep` of them do, spread evenly (0 and layers: all or none)."""
    keep = max(0, min(keep, layers))
    # the j-th checkpointed layer sits in the middle of the j-th of `keep` equal shares of the stack
    chosen = {(2 * j + 1) * layers // (2 * keep) for j in range(keep)}
    return [index in chosen for index in range(layers)]
