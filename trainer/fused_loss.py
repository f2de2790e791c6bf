"""Causal-LM loss that never materialises the full fp32 logits.

With a 128k vocabulary, batch 4 and sequence 2048, the stock head writes 2 GiB of bf16 logits, upcasts
them to 4 GiB of fp32 and keeps both for backward. Here the lm_head matmul and the cross-entropy run
chunk by chunk, and the gradient with respect to the hidden states is computed in the same pass (the
lm_head is frozen under LoRA, so nothing else needs it): peak extra memory is one chunk of logits.
Liger-kernel's Triton version is used when it is active (CUDA); this pure-torch one runs everywhere.

The value is the one transformers computes: the same shift, fp32 log-softmax, ignore_index -100, and
the sum divided by `num_items_in_batch` when the Trainer passes it (else the mean over label tokens).
"""

from __future__ import annotations

import logging
from types import MethodType
from typing import Any, Optional

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Elements of fp32 logits per chunk (2^27 = 512 MiB): small next to activations, large enough to keep
# the matmuls efficient (about 1k tokens per chunk at a 128k vocabulary).
CHUNK_ELEMENTS = 1 << 27
# The attribute of lm_head that holds its weight in pinned host memory (set by trainer.host_embeddings).
HOST_COPY = "_qforge_host_weight"
# The attribute of lm_head that holds its HeadPrefetch (trainer.host_embeddings): the copy in, started early.
PREFETCH = "_qforge_head_prefetch"


def _ce_chunks(hidden: Any, weight: Any, targets: Any, want_grad: bool) -> tuple:
    """Sum of token losses over all chunks, and d(sum)/d(hidden) when asked."""
    import torch

    rows = hidden.shape[0]
    chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad = torch.empty_like(hidden) if want_grad else None
    for start in range(0, rows, chunk):
        h = hidden[start:start + chunk].to(weight.dtype)
        t = targets[start:start + chunk]
        valid = t != IGNORE_INDEX
        safe = torch.where(valid, t, torch.zeros_like(t))
        logits = (h @ weight.t()).float()
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
        total += torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
        if want_grad:
            # d(lse - picked)/d(logits) = softmax - onehot; rows of ignored tokens contribute nothing.
            probs = logits.sub_(lse.unsqueeze(1)).exp_()
            probs[torch.arange(len(t), device=t.device), safe] -= 1.0
            probs.mul_(valid.unsqueeze(1))
            grad[start:start + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
    return total, grad


def _autograd_function() -> Any:
    import torch

    class ChunkedLinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, targets: Any, denominator: Any) -> Any:
            total, grad = _ce_chunks(hidden, weight, targets, want_grad=ctx.needs_input_grad[0])
            ctx.save_for_backward(grad / denominator.to(grad.dtype) if grad is not None else None)
            return total / denominator

        @staticmethod
        def backward(ctx: Any, grad_output: Any) -> tuple:
            (grad,) = ctx.saved_tensors
            return (grad * grad_output.to(grad.dtype) if grad is not None else None), None, None, None

    return ChunkedLinearCrossEntropy


_FUNCTION: Any = None


def linear_cross_entropy(hidden: Any, weight: Any, labels: Any, num_items_in_batch: Optional[Any] = None,
                         use_liger: bool = False) -> Any:
    """Causal-LM loss of `hidden @ weight.T` against `labels` ([batch, seq]), shifted like transformers."""
    import torch

    global _FUNCTION
    if weight.requires_grad:
        raise ValueError("the chunked loss does not compute lm_head gradients; use the stock head")
    hidden = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        denominator = (targets != IGNORE_INDEX).sum().clamp(min=1).float()
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device).float()
    if _FUNCTION is None:
        _FUNCTION = _autograd_function()
    whole = _whole(weight)
    if use_liger:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        total = liger_fused_linear_cross_entropy(hidden, whole, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / denominator
    return _FUNCTION.apply(hidden, whole, targets, denominator)


def _whole(weight: Any) -> Any:
    """lm_head.weight as one local tensor while the loss reads it.

    The stock head gathers a sharded weight in its own forward, which the chunked loss skips. Under FSDP2 (torch
    2.11) the weight is still a sharded DTensor here, so it is gathered (full_tensor). Under ZeRO-3 (DeepSpeed
    0.19) nothing is needed: reading `self.lm_head.weight` inside the model's forward already gathered it
    (DeepSpeed fetches a partitioned parameter read from another module's forward and frees it after that
    forward). The head is frozen, so no gradient flows back through the gather, and the loss keeps no reference
    to it for backward (the hidden-state gradient is computed in the forward pass).
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return weight
    return weight.full_tensor() if isinstance(weight, DTensor) else weight


def head_weight(head: Any, device: Any) -> Any:
    """lm_head's weight in the memory of `device` where trainer.host_embeddings keeps it in pinned host memory: the
    copy its HeadPrefetch started during the forward pass, else one made now (non-blocking, current stream);
    elsewhere the weight itself."""
    prefetch = getattr(head, PREFETCH, None)
    if prefetch is not None:
        return prefetch.take(device)
    host = getattr(head, HOST_COPY, None)
    return head.weight if host is None else host.to(device, non_blocking=True)


def fusable(model: Any) -> bool:
    """A causal LM whose head is a plain frozen linear layer on top of `model.model` (Llama, Mistral, Qwen2...)."""
    import torch

    head = getattr(model, "lm_head", None)
    return (isinstance(head, torch.nn.Linear) and type(head) is torch.nn.Linear and head.bias is None
            and hasattr(model, "model") and getattr(model.config, "final_logit_softcapping", None) is None)


def install(model: Any, use_liger: bool = False) -> bool:
    """Route forwards with labels (training and evaluation) through the chunked loss; generation and other
    unlabelled calls keep the stock head and its logits.

    Evaluation needs only the loss (the Trainer evaluates with prediction_loss_only when there are no metrics,
    which qforge never sets), and the stock head's logits for a whole eval batch are the largest tensor a run
    allocates: 16k tokens x a 128k vocabulary is 4 GiB of bf16 logits plus their fp32 copy and log-softmax.

    The forward is replaced on this instance only, so the outer call (peft, DDP, FSDP) still goes through
    every wrapper and hook. Returns False (and changes nothing) when the model does not fit the pattern.
    """
    if not fusable(model):
        log.info("fused loss: %s has no plain lm_head; keeping the stock loss", type(model).__name__)
        return False
    stock = model.forward

    # Keyword pass-through, never naming the cache argument: transformers renamed it (past_key_values ->
    # cache in 5.24, which warns on the old name), and a training step uses no cache anyway.
    def forward(self: Any, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
        if labels is None or self.lm_head.weight.requires_grad:
            return stock(*args, labels=labels, **kwargs)
        import torch
        from transformers.modeling_outputs import CausalLMOutputWithPast

        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)  # the chunked loss covers every position
        prefetch = getattr(self.lm_head, PREFETCH, None)
        if prefetch is not None:  # the head's copy in starts a few layers before the loss (host_embeddings.py)
            prefetch.arm()
        outputs = self.model(*args, **kwargs)
        # liger's kernel is a training kernel (it computes the hidden states' gradient as it goes); without
        # autograd the torch loop is the same value at one chunk of memory.
        liger = use_liger and torch.is_grad_enabled()
        hidden = outputs.last_hidden_state
        # The head's weight in GPU memory: a copy for this loss only where it lives in host memory
        # (train.embeddings_on_host); nothing here keeps it for backward.
        weight = head_weight(self.lm_head, hidden.device)
        loss = linear_cross_entropy(hidden, weight, labels, num_items, liger)
        return CausalLMOutputWithPast(loss=loss, logits=None)

    model.forward = MethodType(forward, model)
    model._qforge_chunked_loss = True  # trainer.host_embeddings moves the head only where this loss reads it
    return True
