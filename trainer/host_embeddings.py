"""train.embeddings_on_host: the frozen input embedding table lives in pinned host memory and the GPU reads the
rows a batch needs from there, instead of holding the whole table in GPU memory.

An embedding lookup is a gather: of Llama-3-8B's 0.98 GiB table a step of 8k tokens touches 8k rows of 8 KiB
(64 MiB at most), once per forward (the table is frozen: nothing flows back to it, and checkpointing recomputes
decoder layers, never the lookup). So the table moves to pinned host memory and the module's weight becomes a
CUDA tensor that aliases it: with unified virtual addressing (every 64-bit CUDA platform) pinned host memory has
one address that the host and every GPU read it at, so the same embedding kernel reads the same rows, over the
host link instead of from HBM. Nothing is computed differently; a sixth of an 8B bnb4 model's GPU-resident
weights is freed.

Not where the table is trained (peft.method=full, model.resize_vocab with an adapter), shared with lm_head (every
forward and backward GEMM would read it over the link), sharded or broadcast by a strategy (single process only),
or on CPU (where it already is). train.embeddings_on_host=null applies it wherever it can, true refuses a run
where it cannot (rule train.embeddings_on_host), false keeps the table on the GPU.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from trainer.errors import UserError

log = logging.getLogger(__name__)


# ---- plan time (no torch): whether it applies ----

def why_not(device: str, strategy: str, world: int, peft: str, trains_embeddings: bool, tied: Optional[bool],
            device_map: bool) -> Optional[str]:
    """Why the table cannot live in host memory for this run, as the end of a sentence; None when it can.

    tied: whether lm_head shares the table (None: the model's config.json is not readable here)."""
    if device != "cuda":
        return "this run trains on CPU, where the table already is in host memory"
    if strategy != "single" or world > 1:
        return (f"strategy={strategy} broadcasts or shards every parameter across processes, and the host-resident "
                "table is built for one process (strategy=single)")
    if device_map:
        return "model.device_map places the model's modules itself"
    if peft == "full":
        return "peft.method=full trains the embedding table"
    if trains_embeddings:
        return "model.resize_vocab=true trains the embedding table whole beside the adapter (its new rows)"
    if tied:
        return ("the model ties lm_head to the embedding table, so every forward and backward GEMM of the head "
                "would read the whole table over the host link")
    if tied is None:
        return "the model's config.json is not readable here, so whether lm_head shares the table is not known"
    return None


def resolve(wanted: Optional[bool], reason: Optional[str]) -> bool:
    """train.embeddings_on_host: null is on wherever it applies; true where it does not is refused by the rule."""
    return wanted is not False and reason is None


def trains_embeddings(peft_method: str, resize_vocab: bool) -> bool:
    """Whether the run trains the embedding table (trainer.adapters adds it to modules_to_save on resize)."""
    from trainer.adapters_rules import trains_adapter

    return peft_method == "full" or (resize_vocab and trains_adapter(peft_method))


# ---- run time ----

class _PinnedTable:
    """Pinned host memory described to torch by __cuda_array_interface__ (as an integer array of the same element
    size: the interface has no bfloat16); torch keeps this object, and so the memory, alive with the tensor."""

    _TYPESTR = {2: "<i2", 4: "<i4", 1: "|i1", 8: "<i8"}

    def __init__(self, host: Any) -> None:
        self.host = host

    @property
    def __cuda_array_interface__(self) -> Dict[str, Any]:
        return {"shape": tuple(self.host.shape), "typestr": self._TYPESTR[self.host.element_size()],
                "data": (self.host.data_ptr(), False), "version": 3, "strides": None}


def device_view(host: Any) -> Any:
    """A CUDA tensor that reads `host` (pinned, contiguous) in place: same address, no copy in GPU memory."""
    import torch

    as_int = {2: torch.int16, 4: torch.int32, 1: torch.int8, 8: torch.int64}[host.element_size()]
    view = torch.as_tensor(_PinnedTable(host.view(as_int)), device="cuda").view(host.dtype)
    if view.data_ptr() != host.data_ptr() or view.device.type != "cuda":
        # torch copies instead of aliasing when the pointer belongs to another device's context: that would keep
        # the table on the GPU after all, so say so rather than silently use the memory.
        raise UserError("train.embeddings_on_host: this GPU cannot read the pinned table in place (no unified "
                        "addressing for it here); set train.embeddings_on_host=false.")
    return view


def _wide_lookup(module: Any) -> Any:
    """The lookup as a gather of 8-byte words: the stock kernel reads one 2-byte element per thread, which over
    the host link is latency-bound; the same rows read as int64 take a quarter of the requests. The result is
    the same bytes (a frozen table: no gradient, so padding_idx changes nothing)."""
    import torch

    weight = module.weight
    words = weight.view(torch.int64)  # [rows, hidden * element_size / 8], still the host memory

    def forward(ids: Any) -> Any:
        rows = torch.index_select(words, 0, ids.reshape(-1))
        return rows.view(weight.dtype).reshape(*ids.shape, weight.shape[1])

    return forward


def _to_host(module: Any) -> Any:
    """Replace `module.weight` (on a CUDA GPU) with a frozen view of a pinned host copy; the host copy."""
    import torch

    weight = module.weight
    host = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=True)
    host.copy_(weight.detach())
    with torch.cuda.device(weight.device):
        view = device_view(host)
    module.weight = torch.nn.Parameter(view, requires_grad=False)
    return host


def move(model: Any) -> int:
    """Move the (frozen, untied) input embedding table of a loaded CUDA model to pinned host memory, and lm_head's
    weight too where the chunked loss reads it (trainer/fused_loss.py installed); the bytes freed on the GPU."""

    module = model.get_input_embeddings()
    weight = module.weight
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None and head.weight.data_ptr() == weight.data_ptr():
        raise UserError("train.embeddings_on_host=true, but this model's lm_head shares the embedding table (tied "
                        "weights), which every head GEMM would then read over the host link; set "
                        "train.embeddings_on_host=false.")
    if weight.device.type != "cuda":
        raise UserError(f"train.embeddings_on_host: the embedding table is on {weight.device}, not a CUDA GPU; set "
                        "train.embeddings_on_host=false.")
    host = _to_host(module)
    module._qforge_host_table = host  # the view already keeps it alive; this names it for whoever looks
    if getattr(module, "max_norm", None) is None and weight.shape[1] * weight.element_size() % 8 == 0:
        module.forward = _wide_lookup(module)
    nbytes = host.numel() * host.element_size()
    log.info("embeddings: the %d x %d table (%.2f GiB) in pinned host memory, read by the GPU row by row "
             "(train.embeddings_on_host)", weight.shape[0], weight.shape[1], nbytes / 2**30)
    if getattr(model, "_qforge_chunked_loss", False) and head is not None:
        from trainer.offload import decoder_layers

        nbytes += _move_head(head, decoder_layers(model))
    return nbytes


# How many decoder layers before the loss the head's copy in starts: at 55 GB/s Llama-3-8B's 1 GiB head takes
# ~20 ms, and a layer's forward at 8k tokens ~8 ms; host-to-device is otherwise idle in forward (activation
# offload copies the other way). Copied in at the loss instead, the GPU waited the whole copy (run 13's profile).
HEAD_LEAD_LAYERS = 4


class HeadPrefetch:
    """Copies lm_head's weight in from pinned host memory on a side stream, started a few decoder layers before
    the loss reads it (a forward pre-hook on that layer), so the copy overlaps the last layers' compute.

    It starts only when armed: the chunked loss arms it at the top of each labelled forward. Checkpointing's
    recompute in backward runs the same layers again (and their hooks) but is not armed, so the head is never
    brought in for a backward that does not read it. Without a prefetched copy `take` copies in on the current
    stream, as before."""

    def __init__(self, host: Any, lead_layer: Optional[Any]) -> None:
        self.host = host
        self.armed = False
        self.copies = 0  # how many copies the side stream made, for tests and logs
        self._copy: Any = None
        self._ready: Any = None
        self._stream: Any = None
        if lead_layer is not None:
            lead_layer.register_forward_pre_hook(self._start)

    def arm(self) -> None:
        self.armed = True

    def _start(self, module: Any, args: Any) -> None:
        import torch

        if not self.armed:
            return
        self.armed = False
        device = next((t.device for t in args if isinstance(t, torch.Tensor)), None)
        if self._copy is not None or device is None or device.type != "cuda":
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        # The host copy is frozen and the destination is new: the copy waits for nothing on the compute stream.
        with torch.cuda.stream(self._stream):
            self._copy = self.host.to(device, non_blocking=True)
        self._ready = self._stream.record_event()
        self.copies += 1

    def take(self, device: Any) -> Any:
        """The head's weight on `device`: the prefetched copy (the current stream waits for it), else a copy now."""
        import torch

        copy, self._copy = self._copy, None
        if copy is None or copy.device != torch.device(device):
            return self.host.to(device, non_blocking=True)
        current = torch.cuda.current_stream(copy.device)
        current.wait_event(self._ready)
        copy.record_stream(current)  # its memory is freed once the loss's kernels, not the side stream's, are done
        return copy


def _move_head(head: Any, layers: list) -> int:
    """lm_head's weight to pinned host memory: the chunked loss copies it in for the loss (trainer/fused_loss.py
    head_weight, HeadPrefetch above) and keeps nothing for backward, so the GPU holds it only around the loss, not
    at the backward's peak. The module's weight becomes a view of the host copy (device checks and .to() see a CUDA
    tensor), and its own forward (generation, unlabelled calls) copies the weight in the same way."""
    import torch

    from trainer.fused_loss import HOST_COPY, PREFETCH, head_weight

    host = _to_host(head)
    setattr(head, HOST_COPY, host)
    lead = layers[-min(HEAD_LEAD_LAYERS, len(layers))] if layers else None
    setattr(head, PREFETCH, HeadPrefetch(host, lead))

    def forward(hidden: Any) -> Any:
        return torch.nn.functional.linear(hidden, head_weight(head, hidden.device))

    head.forward = forward
    nbytes = host.numel() * host.element_size()
    log.info("lm_head: its %.2f GiB weight in pinned host memory, copied in for each loss from %d decoder layers "
             "before it (train.embeddings_on_host)", nbytes / 2**30, min(HEAD_LEAD_LAYERS, len(layers)))
    return nbytes
