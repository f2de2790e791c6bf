"""The fused LoRA branch gives peft's output and gradients, with the dropout mask replayed, not stored."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from trainer import lora_fused
from trainer.lora_fused import LoraBranch, _keep_mask


def _lora_layer(p: float, use_dora: bool = False, seed: int = 0) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(64, 48))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=p, target_modules=["proj"],
                                            use_dora=use_dora))
    layer = model.base_model.model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # peft starts B at zero; make the branch count
    return model


def _grads(model: torch.nn.Module, x: torch.Tensor, between=None) -> tuple:
    x = x.clone().requires_grad_(True)
    layer = model.base_model.model.proj
    out = model(x)
    if between is not None:
        between()
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = (out.detach(), x.grad, layer.lora_A["default"].weight.grad.clone(),
             layer.lora_B["default"].weight.grad.clone())
    model.zero_grad()
    return grads


def _close(a: tuple, b: tuple, tol: float = 1e-5) -> None:
    for left, right in zip(a, b, strict=True):
        torch.testing.assert_close(left, right, rtol=tol, atol=tol)


def test_without_dropout_fused_equals_peft() -> None:
    x = torch.randn(2, 5, 64)
    peft_model = _lora_layer(0.0)
    expected = _grads(peft_model, x)
    assert lora_fused.install(peft_model) == 1
    _close(_grads(peft_model, x), expected)


def test_dropout_mask_replayed_in_backward_even_after_the_rng_moved() -> None:
    p = 0.3
    x = torch.randn(3, 7, 64)
    model = _lora_layer(p)
    layer = model.base_model.model.proj
    lora_fused.install(model)
    model.train()
    torch.manual_seed(11)
    # Anything drawing random numbers between forward and backward (other dropouts, checkpoint replays).
    fused = _grads(model, x, between=lambda: torch.rand(1000))

    # Reference: plain autograd with the mask the fused forward drew (same RNG state, same draw).
    torch.manual_seed(11)
    mask = _keep_mask(x, p)
    xr = x.clone().requires_grad_(True)
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    out = layer.base_layer(xr) + ((xr * mask / (1 - p)) @ a.t() @ b.t()) * layer.scaling["default"]
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    _close(fused, (out.detach(), xr.grad, a.grad, b.grad))
    # The mask is a real dropout mask: about p of the inputs dropped.
    assert abs(float(_keep_mask(torch.empty(200_000), p).mean()) - (1 - p)) < 0.01


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_replays_the_same_mask(reentrant: bool) -> None:
    x = torch.randn(2, 9, 64)
    model = _lora_layer(0.25)
    lora_fused.install(model)
    model.train()
    torch.manual_seed(3)
    plain = _grads(model, x)

    class Checkpointed(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.base_model = inner.base_model
            self.inner = inner

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            return checkpoint(self.inner, inp, use_reentrant=reentrant)

    torch.manual_seed(3)
    _close(_grads(Checkpointed(model), x, between=lambda: torch.rand(10)), plain)


def test_eval_mode_and_dora_run_the_peft_path_unchanged() -> None:
    x = torch.randn(2, 4, 64)
    dora = _lora_layer(0.1, use_dora=True)
    dora.eval()
    expected = dora(x)
    assert lora_fused.install(dora) == 1
    torch.testing.assert_close(dora(x), expected)  # DoRA is a lora_variant: peft's forward runs

    model = _lora_layer(0.5)
    model.eval()
    expected = model(x)
    lora_fused.install(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)  # no dropout in eval


def test_fused_layer_under_autocast_returns_compute_dtype_and_fp32_weight_grads() -> None:
    model = _lora_layer(0.1)
    lora_fused.install(model)
    layer = model.base_model.model.proj
    x = torch.randn(2, 3, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def test_fused_branch_function_saves_no_dropped_copy_of_the_input() -> None:
    """What backward keeps: the input (shared with the base layer), the weights and the N x r activations."""
    x = torch.randn(4, 32, 64, requires_grad=True)
    result = torch.randn(4, 32, 48, requires_grad=True)
    a = torch.randn(8, 64, requires_grad=True)
    b = torch.randn(48, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        LoraBranch.apply(result, x, a, b, 0.2, 2.0)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()


def _tiny_bnb4_lora(dropout: float, checkpointing: bool, fused: bool) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from trainer.schema import TinyArch
    from trainer.tiny import ensure_tiny_model

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    path = ensure_tiny_model(TinyArch())  # first: building it (once per cache) draws from the global RNG
    torch.manual_seed(0)  # the LoRA A init
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32)
    model.config.use_cache = False
    if checkpointing:  # as qforge runs it (plan.py): non-reentrant
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    if fused:
        assert lora_fused.install(model) == 7 * model.config.num_hidden_layers
    model.train()
    return model


def _loss_and_grads(model: torch.nn.Module) -> tuple:
    ids = torch.randint(4, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)  # the dropout draws
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same(a: tuple, b: tuple) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    assert a[1].keys() == b[1].keys() and len(a[1]) > 0
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_bnb4_model_fused_matches_peft(checkpointing: bool) -> None:
    """A real bnb 4-bit tiny Llama, LoRA on every linear layer (norm outputs and the MLP product are
    recomputed in backward, not kept): same loss and adapter grads as peft, with and without checkpointing."""
    pytest.importorskip("bitsandbytes")
    _same(_loss_and_grads(_tiny_bnb4_lora(0.0, checkpointing, fused=True)),
          _loss_and_grads(_tiny_bnb4_lora(0.0, checkpointing, fused=False)))


def test_dropout_masks_survive_checkpoint_replay_in_a_model() -> None:
    """With dropout, checkpointed and plain runs draw the same masks, so the grads agree."""
    pytest.importorskip("bitsandbytes")
    _same(_loss_and_grads(_tiny_bnb4_lora(0.2, True, fused=True)),
          _loss_and_grads(_tiny_bnb4_lora(0.2, False, fused=True)))


def test_norm_outputs_and_mlp_product_are_not_kept_for_backward() -> None:
    pytest.importorskip("bitsandbytes")
    model = _tiny_bnb4_lora(0.1, False, fused=True)
    recomputed = []  # the tensors backward should rebuild, held so their storage is not reused
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            for norm in (module.input_layernorm, module.post_attention_layernorm):
                norm.register_forward_hook(lambda m, a, out: recomputed.append(out))
            module.mlp.down_proj.register_forward_pre_hook(lambda m, a: recomputed.append(a[0]))
    saved = []
    ids = torch.randint(4, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    assert len(recomputed) == 3 * model.config.num_hidden_layers
    kept = {t.untyped_storage().data_ptr() for t in saved}
    assert not kept & {t.untyped_storage().data_ptr() for t in recomputed}
    loss.backward()  # and backward still works from the recipes
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


@pytest.mark.gpu
@pytest.mark.parametrize("rank,rows,cols", [(16, 4096, 1024), (8, 1000, 1000)])
def test_cuda_kernels_match_torch_with_the_same_mask(rank: int, rows: int, cols: int) -> None:
    """The three Triton products equal plain torch math on the mask keep_mask draws for the seed."""
    from trainer import lora_kernels

    dev, p, seed = torch.device("cuda"), 0.1, 1234
    x = torch.randn(rows, cols, device=dev, dtype=torch.bfloat16)
    a = torch.randn(rank, cols, device=dev, dtype=torch.bfloat16) * 0.05
    dh = torch.randn(rows, rank, device=dev, dtype=torch.bfloat16)
    padded = lora_kernels.padded_rank(rank)
    a_pad = torch.cat([a, a.new_zeros(padded - rank, cols)])
    dh_pad = torch.cat([dh, dh.new_zeros(rows, padded - rank)], dim=1)
    keep = lora_kernels.keep_mask(rows, cols, seed, p, dev)
    assert abs(float(keep.mean()) - (1 - p)) < 0.01
    assert torch.equal(keep, lora_kernels.keep_mask(rows, cols, seed, p, dev))  # same seed, same mask
    dropped = (x.float() * keep)
    torch.testing.assert_close(lora_kernels.masked_xa(x, a_pad, seed, p)[:, :rank].float(),
                               dropped @ a.float().t(), rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(lora_kernels.masked_dha(dh_pad, x, seed, p)[:rank],
                               dh.float().t() @ dropped, rtol=2e-2, atol=5e-1)
    torch.testing.assert_close(lora_kernels.masked_dx(dh_pad, a_pad, seed, p).float(),
                               (dh.float() @ a.float()) * keep, rtol=2e-2, atol=5e-2)


@pytest.mark.gpu
def test_cuda_branch_keeps_no_copy_and_matches_autograd() -> None:
    """On CUDA in bf16 the branch (Triton path) gives plain autograd's grads on the same mask, and
    keeps nothing input-sized between forward and backward."""
    from trainer import lora_kernels

    p, dev = 0.05, torch.device("cuda")
    x = torch.randn(4, 512, 1024, device=dev, dtype=torch.bfloat16, requires_grad=True)
    result = torch.randn(4, 512, 2048, device=dev, dtype=torch.bfloat16, requires_grad=True)
    a = (torch.randn(16, 1024, device=dev) * 0.02).requires_grad_(True)
    b = (torch.randn(2048, 16, device=dev) * 0.02).requires_grad_(True)
    weights = torch.linspace(-1, 1, 2048, device=dev, dtype=torch.bfloat16)

    torch.manual_seed(5)
    before = torch.cuda.memory_allocated()
    out = LoraBranch.apply(result, x, a, b, p, 2.0)
    kept = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
    torch.rand(4096, device=dev)  # the RNGs move on before backward
    torch.rand(16)
    (out * weights).sum().backward()
    fused = (out.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone())
    assert kept < x.numel() * x.element_size() // 4

    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    mask = lora_kernels.keep_mask(4 * 512, 1024, seed, p, dev).view(x.shape).to(torch.bfloat16)
    for t in (x, a, b):
        t.grad = None
    ref = result + ((x * mask / (1 - p)) @ a.to(torch.bfloat16).t() @ b.to(torch.bfloat16).t()) * 2.0
    (ref * weights).sum().backward()
    for left, right in zip(fused, (ref.detach(), x.grad, a.grad, b.grad), strict=True):
        # bf16 products: compare as a whole (relative norm), not element by element.
        assert float((left.float() - right.float()).norm() / right.float().norm()) < 1e-2


def test_auto_sends_small_calls_to_peft_and_large_ones_to_the_fused_branch(monkeypatch) -> None:
    """train.fused_lora=null: few tokens x a small hidden size is Python-bound work, so peft's forward runs."""
    model = _lora_layer(0.1)
    layer = model.base_model.model.proj
    calls = []
    original = LoraBranch.apply
    monkeypatch.setattr(LoraBranch, "apply", lambda *a: calls.append(1) or original(*a))
    lora_fused.install(model, auto=True)
    layer._qforge_auto_hidden = 64  # as install(auto=True) records it from a 64-wide model's config
    x = torch.randn(4, 16, 64, requires_grad=True)
    model(x).sum().backward()
    assert calls == []
    monkeypatch.setattr(lora_fused, "MIN_TOKENS_X_HIDDEN", 64 * 64)
    model(x).sum().backward()
    assert calls == [1]


def _one_node(layer: torch.nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The 4-bit base product + a LoRA branch (scaling 2, no dropout) through QLoraLinear4bit, as peft runs it."""
    return lora_fused.QLoraLinear4bit.apply(layer.weight, x, a, b, 0.0, 2.0, layer.weight.quant_state,
                                            layer.compute_dtype)


def _count_4bit_nodes(monkeypatch) -> list:
    from trainer.lora_fused import QLoraLinear4bit

    calls: list = []
    original = QLoraLinear4bit.apply
    monkeypatch.setattr(QLoraLinear4bit, "apply", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_bnb4_base_joins_the_branch_in_one_node_with_the_same_values(monkeypatch, dropout: float) -> None:
    """The 4-bit base product runs inside the branch's node (bnb4_base.py) on every adapted layer, and the loss
    and adapter grads equal bitsandbytes' own matmul + the fused branch (the same dropout draws)."""
    pytest.importorskip("bitsandbytes")
    calls = _count_4bit_nodes(monkeypatch)
    one_node = _loss_and_grads(_tiny_bnb4_lora(dropout, True, fused=True))
    layers = 7 * 2  # the tiny model's adapted layers: forward, then checkpointing's replay in backward
    assert len(calls) == layers * _tiny_bnb4_lora(0.0, False, fused=False).config.num_hidden_layers
    monkeypatch.setattr(lora_fused, "FUSE_4BIT_BASE", False)
    calls.clear()
    two_nodes = _loss_and_grads(_tiny_bnb4_lora(dropout, True, fused=True))
    assert calls == []
    _same(one_node, two_nodes)


def test_bnb4_node_keeps_nothing_weight_sized_and_dequantizes_like_bitsandbytes() -> None:
    """Backward gets the weight by dequantizing again: nothing of W is saved; the weight is bitsandbytes' own."""
    bnb = pytest.importorskip("bitsandbytes")
    from trainer import bnb4_base

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(256, 128, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(128, 256) * 0.05, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    layer = layer.to("cpu")
    x = torch.randn(3, 16, 256, requires_grad=True)
    assert bnb4_base.applies(layer, x)
    state = layer.weight.quant_state
    import bitsandbytes.functional as bnb_functional

    torch.testing.assert_close(bnb4_base.dequantize(layer.weight, state, torch.float32),
                               bnb_functional.dequantize_4bit(layer.weight, state).float())
    a, b = torch.randn(8, 256, requires_grad=True), torch.randn(128, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = _one_node(layer, x, a, b)
    assert not [t for t in saved if t.numel() >= 128 * 256 // 2]  # neither W nor its packed bytes
    out.sum().backward()
    grads = (out.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone())
    for t in (x, a, b):
        t.grad = None
    ref = layer(x) + (x @ a.t()) @ b.t() * 2.0
    ref.sum().backward()
    _close(grads, (ref.detach(), x.grad, a.grad, b.grad), tol=1e-4)


def _ops_called(fn) -> list:
    """The aten ops `fn` runs (their overload names), in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Record() as record:
        fn()
    return record.ops


def test_the_4bit_node_adds_the_branch_into_its_own_base_product_in_place() -> None:
    """QLoraLinear4bit adds the LoRA product into the base product it made (addmm_: no output-sized copy of it);
    the branch over a result it did not make (peft's base layer output) adds out of place and leaves it as it
    was. Both equal the plain math."""
    bnb = pytest.importorskip("bitsandbytes")

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 96, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 128) * 0.05, requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")
    x = torch.randn(2, 8, 128, requires_grad=True)
    a, b = torch.randn(4, 128, requires_grad=True), torch.randn(96, 4, requires_grad=True)
    with torch.no_grad():
        expected = layer(x) + (x @ a.t()) @ b.t() * 2.0
    ops = _ops_called(lambda: _one_node(layer, x, a, b))
    assert "aten.addmm_" in ops and "aten.addmm" not in ops
    torch.testing.assert_close(_one_node(layer, x, a, b).detach(), expected, rtol=1e-5, atol=1e-5)

    base = layer(x).detach()
    kept = base.clone()
    ops = _ops_called(lambda: LoraBranch.apply(base, x, a, b, 0.0, 2.0))
    assert "aten.addmm" in ops and "aten.addmm_" not in ops
    assert torch.equal(base, kept)
    torch.testing.assert_close(LoraBranch.apply(base, x, a, b, 0.0, 2.0).detach(), expected, rtol=1e-5, atol=1e-5)


def test_bnb4_node_skips_layers_it_cannot_read() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from trainer import bnb4_base

    with_bias = bnb.nn.Linear4bit(64, 32, bias=True, quant_type="nf4")
    with_bias.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
    with_bias = with_bias.to("cpu")
    assert not bnb4_base.applies(with_bias, torch.randn(2, 64))
    assert not bnb4_base.applies(torch.nn.Linear(64, 32, bias=False), torch.randn(2, 64))


@pytest.mark.gpu
def test_cuda_bnb4_node_calls_the_kernels_directly_and_matches_bitsandbytes() -> None:
    """On CUDA in bf16, with double quant: the dequantize launchers are bitsandbytes' own (found, not the
    fallback), the weight is bit-identical to its dequantize_4bit, and output and grads match its matmul + the
    branch (bf16 products summed in another order: compared as a whole)."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnb_functional

    from trainer import bnb4_base

    assert bnb4_base._cuda_kernels() is not None
    dev, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(1024, 2048, bias=False, compute_dtype=dtype, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(2048, 1024) * 0.05, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    layer = layer.to(dev)
    state = layer.weight.quant_state
    assert state.nested
    assert torch.equal(bnb4_base.dequantize(layer.weight, state, dtype),
                       bnb_functional.dequantize_4bit(layer.weight, state).to(dtype))
    x = torch.randn(4, 1024, 1024, device=dev, dtype=dtype, requires_grad=True)
    a = (torch.randn(16, 1024, device=dev) * 0.02).requires_grad_(True)
    b = (torch.randn(2048, 16, device=dev) * 0.02).requires_grad_(True)
    weights = torch.linspace(-1, 1, 2048, device=dev, dtype=dtype)

    def run(one_node: bool) -> tuple:
        for t in (x, a, b):
            t.grad = None
        out = (_one_node(layer, x, a, b) if one_node
               else LoraBranch.apply(layer(x), x, a, b, 0.0, 2.0))
        (out * weights).sum().backward()
        return out.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone()

    for left, right in zip(run(True), run(False), strict=True):
        assert float((left.float() - right.float()).norm() / right.float().norm()) < 1e-2
