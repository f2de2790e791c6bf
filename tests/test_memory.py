"""trainer/memory.py: the per-GPU breakdown from first principles, against the libraries, against the recorded
GPU measurements, its rules, checkpoint_layers=auto, and that it is total and fast over random compositions."""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from trainer import memory
from trainer.compose import compose, compose_all
from trainer.env import Accelerators
from trainer.validate import validate

GIB = 2**30
REPO = Path(__file__).resolve().parent.parent

# Llama-3-8B's and Llama-3.2-1B's shapes as bench/workload.py builds them (untied heads).
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}


@pytest.fixture(scope="module")
def shape_dirs(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("shapes")
    dirs = {}
    for name, shape in SHAPES.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False,
                                                             **shape}))
        dirs[name] = root / name
    return dirs


def term(p: memory.Prediction, prefix: str) -> float:
    found = [t.bytes for t in p.static if t.name.startswith(prefix)]
    assert found, f"no term {prefix!r} in {[t.name for t in p.static]}"
    return sum(found)


def linear_params(shape: Dict[str, int]) -> int:
    h, i, heads, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"], \
        shape["num_key_value_heads"]
    d = h // heads
    per_layer = h * heads * d * 2 + h * kv * d * 2 + 3 * h * i  # q, o; k, v; gate, up, down
    return per_layer * shape["num_hidden_layers"]


def gpu(*overrides: str, packed_rows: Any = None) -> memory.Prediction:
    return memory.predict(compose(list(overrides)), device="cuda", packed_rows=packed_rows)


# ---- base weights by backend and bits, from first principles -------------------------------------------

@pytest.mark.parametrize("quant, bytes_per_param", [
    (["quant=none"], 2.0),  # bf16
    (["quant=bnb4"], 0.5),  # nf4: two weights per byte
    (["quant=bnb8"], 1.0),  # int8
    (["quant=hqq", "quant.bits=4"], 0.5),
    (["quant=hqq", "quant.bits=2"], 0.25),
    (["quant=hqq", "quant.bits=8"], 1.0),
])
def test_8b_base_weights_are_params_times_bits(shape_dirs: Dict[str, Path], quant: List[str],
                                               bytes_per_param: float) -> None:
    p = gpu("model=local", f"model.name_or_path={shape_dirs['8b']}", *quant, "train.embeddings_on_host=false")
    params = linear_params(SHAPES["8b"])
    assert 6.9e9 < params < 7.0e9  # Llama-3-8B's decoder linears
    assert term(p, "base weights") == pytest.approx(params * bytes_per_param, rel=1e-9)
    embed = SHAPES["8b"]["vocab_size"] * SHAPES["8b"]["hidden_size"] * 2
    assert term(p, "embeddings") == term(p, "lm_head") == embed  # never quantized, 16-bit


def test_the_embedding_table_moves_to_host_memory_wherever_it_can(shape_dirs: Dict[str, Path],
                                                                   tmp_path: Path) -> None:
    """train.embeddings_on_host=null: on for one CUDA process with a frozen, untied table; its bytes leave the GPU
    terms and join the pinned host memory, and so do lm_head's where the chunked loss reads it (copied in for the
    loss only, so it counts at the forward's end, not in backward); off under a multi-process strategy, full
    tuning, a resized vocabulary, a tied head, or on CPU."""
    model = ["model=local", f"model.name_or_path={shape_dirs['8b']}", "quant=bnb4", "do_eval=false"]
    embed = SHAPES["8b"]["vocab_size"] * SHAPES["8b"]["hidden_size"] * 2
    on, off = gpu(*model), gpu(*model, "train.embeddings_on_host=false")
    assert on.embeddings_on_host and not off.embeddings_on_host
    assert term(on, "embeddings") == term(on, "lm_head") == 0 and term(off, "embeddings") == embed
    assert on.host_bytes - off.host_bytes == 2 * embed
    assert on.phase_bytes("backward") == pytest.approx(off.phase_bytes("backward") - 2 * embed)
    assert on.phase_bytes("forward end (loss)") == pytest.approx(off.phase_bytes("forward end (loss)") - embed)
    assert any("table in pinned host memory" in note for note in on.assumptions)
    stock = gpu(*model, "train.fused_ce=false")  # the stock head's backward reads its weight: it stays
    assert stock.embeddings_on_host and term(stock, "lm_head") == embed and term(stock, "embeddings") == 0
    assert stock.host_bytes - gpu(*model, "train.fused_ce=false", "train.embeddings_on_host=false").host_bytes == embed
    launch = ["launcher=torchrun", "launcher.nproc_per_node=2"]
    for stays in (["strategy=ddp", *launch], ["strategy=fsdp", *launch], ["peft=full"], ["model.resize_vocab=true"]):
        p = gpu(*model, *stays)
        assert not p.embeddings_on_host and term(p, "embeddings") > 0, stays
    assert not memory.predict(compose(model), device="cpu").embeddings_on_host
    tied = tmp_path / "tied"
    tied.mkdir()
    (tied / "config.json").write_text(json.dumps({**SHAPES["8b"], "model_type": "llama", "tie_word_embeddings": True}))
    assert not gpu("model=local", f"model.name_or_path={tied}", "quant=bnb4").embeddings_on_host


def test_bnb4_constants_and_double_quant_saves_037_bit(shape_dirs: Dict[str, Path]) -> None:
    params = linear_params(SHAPES["8b"])
    model = ["model=local", f"model.name_or_path={shape_dirs['8b']}", "quant=bnb4"]
    plain = term(gpu(*model, "quant.double_quant=false"), "quantization constants")
    double = term(gpu(*model, "quant.double_quant=true"), "quantization constants")
    assert plain == pytest.approx(params / 64 * 4, rel=1e-3)  # one fp32 absmax per 64-weight block
    # an 8-bit absmax per block plus an fp32 absmax per 256 blocks (and ~1 KiB of code tables per matrix)
    assert double == pytest.approx(params / 64 * (1 + 4 / 256), rel=3e-3)
    assert (plain - double) * 8 / params == pytest.approx(0.37, abs=0.01)


def test_bnb8_row_scales_and_hqq_group_constants(shape_dirs: Dict[str, Path]) -> None:
    s = SHAPES["8b"]
    h, i, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    kv = s["num_key_value_heads"] * h // s["num_attention_heads"]
    rows = (h + kv + kv + h + i + i + h) * layers  # output features of q, k, v, o, gate, up, down
    model = ["model=local", f"model.name_or_path={shape_dirs['8b']}"]
    assert term(gpu(*model, "quant=bnb8"), "quantization constants") == 4 * rows  # fp32 SCB per row
    params = linear_params(s)
    for group in (64, 128):
        got = term(gpu(*model, "quant=hqq", f"quant.group_size={group}"), "quantization constants")
        assert got == pytest.approx(params / group * 2 * 2, rel=1e-6)  # bf16 scale and zero per group


def test_prequantized_gptq_reads_its_config(tmp_path: Path) -> None:
    config = {"model_type": "llama", **SHAPES["1b"],
              "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    p = gpu("model=local", f"model.name_or_path={tmp_path}", "quant=gptq")
    params = linear_params(SHAPES["1b"])
    assert term(p, "base weights") == pytest.approx(params / 2)
    # scales (fp16) and packed 4-bit zeros per 32 inputs, and an int32 g_idx per input feature
    consts = term(p, "quantization constants")
    assert params / 32 * 2.5 < consts < params / 32 * 2.5 + 4 * 8192 * 7 * 16 + 1
    config["quantization_config"]["group_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert term(gpu("model=local", f"model.name_or_path={tmp_path}", "quant=gptq"), "quantization constants") \
        < consts / 3


def test_tiny_model_bytes_match_the_real_quantized_modules() -> None:
    """What qforge's own loaders build on CPU (fp32 compute) is what the model says, tensor for tensor."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("hqq")
    from trainer.model import load_model
    from trainer.plan import build_plan

    for overrides in (["quant=none"], ["quant=bnb4"], ["quant=bnb4", "quant.double_quant=false"], ["quant=bnb8"],
                      ["quant=hqq", "quant.bits=4"], ["quant=hqq", "quant.bits=3", "quant.group_size=32"]):
        cfg = compose(overrides)
        p = memory.predict(cfg, device="cpu")
        model = load_model(build_plan(cfg))
        weights, consts = _decoder_linear_bytes(model)
        assert weights == pytest.approx(term(p, "base weights"), rel=1e-6), overrides
        predicted_consts = sum(t.bytes for t in p.static if t.name.startswith("quantization constants"))
        assert consts == pytest.approx(predicted_consts, rel=0.02, abs=64), overrides
        embed = model.get_input_embeddings().weight
        assert embed.numel() * embed.element_size() == term(p, "embeddings")


def _decoder_linear_bytes(model: Any) -> tuple:
    """(stored weight bytes, quantization-constant bytes) of the decoder's linear layers, as allocated."""
    import torch

    weights = consts = 0
    for module in model.get_decoder().modules():
        if list(module.children()) or "Linear" not in type(module).__name__:
            continue
        weight = getattr(module, "weight", None)
        if hasattr(module, "W_q"):  # HQQLinear
            weights += module.W_q.numel() * module.W_q.element_size()
            consts += sum(v.numel() * v.element_size() for v in module.meta.values() if isinstance(v, torch.Tensor))
        elif weight is not None and weight.dim() == 2 or hasattr(weight, "quant_state"):
            weights += weight.numel() * weight.element_size()
            state = getattr(weight, "quant_state", None)
            if state is not None:
                tensors = [state.absmax, state.code]
                if state.nested:
                    tensors += [state.state2.absmax, state.state2.code, state.offset]
                consts += sum(t.numel() * t.element_size() for t in tensors)
            scb = getattr(weight, "SCB", None)
            if scb is not None:
                consts += scb.numel() * scb.element_size()
    return weights, consts


# ---- adapters, optimizer, sharding ---------------------------------------------------------------------

def test_lora_parameters_gradients_and_adamw_state(shape_dirs: Dict[str, Path]) -> None:
    p = gpu("model=local", f"model.name_or_path={shape_dirs['8b']}", "quant=bnb4", "peft.r=16")
    s = SHAPES["8b"]
    h, i = s["hidden_size"], s["intermediate_size"]
    kv = s["num_key_value_heads"] * h // s["num_attention_heads"]
    lora = 16 * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3) * s["num_hidden_layers"]
    assert lora == 41_943_040
    assert term(p, "LoRA r=16 parameters (fp32") == 4 * lora  # peft upcasts adapters to fp32
    assert term(p, "optimizer state") == 8 * lora  # AdamW: two fp32 states
    step = next(ph for ph in p.phases if ph.name == "optimizer step")
    assert next(t.bytes for t in step.terms if t.name == "gradients") == 4 * lora


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharding_divides_params_and_optimizer_but_not_quant_constants(shape_dirs: Dict[str, Path],
                                                                       strategy: str) -> None:
    model = ["model=local", f"model.name_or_path={shape_dirs['8b']}", "quant=bnb4", "launcher=torchrun"]
    one = gpu(*model, "strategy=single", "train.embeddings_on_host=false")
    for world in (2, 8):
        many = gpu(*model, f"strategy={strategy}", f"launcher.nproc_per_node={world}")
        for name in ("base weights", "embeddings", "lm_head", "optimizer state"):
            assert term(many, name) == pytest.approx(term(one, name) / world, rel=0.02), (strategy, world, name)
        assert term(many, "quantization constants") == term(one, "quantization constants")  # never sharded
        assert term(many, "LoRA r=16 parameters") < term(one, "LoRA r=16 parameters") / world * 1.3


def test_ddp_keeps_a_full_copy_and_zero2_shards_only_optimizer_state(shape_dirs: Dict[str, Path]) -> None:
    model = ["model=local", f"model.name_or_path={shape_dirs['8b']}", "quant=bnb4", "launcher=torchrun",
             "launcher.nproc_per_node=4"]
    one = gpu(*model[:-2], "strategy=single", "train.embeddings_on_host=false")
    ddp = gpu(*model, "strategy=ddp")
    zero2 = gpu(*model, "strategy=zero2")
    for name in ("base weights", "embeddings", "lm_head"):
        assert term(ddp, name) == term(zero2, name) == term(one, name)
    assert term(ddp, "DDP gradient buckets") == term(one, "LoRA r=16 parameters")  # fp32 grads, one more copy
    assert term(zero2, "optimizer state") == pytest.approx(term(one, "optimizer state") / 4)
    assert term(zero2, "DeepSpeed fp32 master copy") == pytest.approx(term(one, "LoRA r=16 parameters") / 4)
    offload = gpu(*model, "strategy=zero3_offload")
    assert term(offload, "base weights") == 0 and term(offload, "optimizer state") == 0


def test_sharded_bnb4_loads_whole_on_every_gpu(shape_dirs: Dict[str, Path]) -> None:
    model = ["model=local", f"model.name_or_path={shape_dirs['8b']}", "launcher=torchrun",
             "launcher.nproc_per_node=8", "strategy=fsdp"]
    bnb4 = gpu(*model, "quant=bnb4")
    loading = bnb4.phase_bytes("loading")
    assert loading > linear_params(SHAPES["8b"]) * 0.5  # the whole 4-bit model, not an eighth of it
    assert bnb4.phase_bytes("loading") > bnb4.static_bytes
    assert gpu(*model, "quant=none").phase_bytes("loading") == 0  # loaded on CPU, sharded from there


# ---- activations -------------------------------------------------------------------------------------

def test_checkpointing_more_layers_never_needs_more(shape_dirs: Dict[str, Path]) -> None:
    model = ["model=local", f"model.name_or_path={shape_dirs['8b']}", "quant=bnb4", "do_eval=false",
             "train.max_seq_len=2048", "model.liger=true", "train.offload_activations=false"]
    peaks = [gpu(*model, f"train.checkpoint_layers={n}").train_peak_bytes for n in range(0, 33, 4)]
    assert all(a >= b for a, b in zip(peaks, peaks[1:])), peaks
    assert peaks[0] > 3 * peaks[-1]
    every = gpu(*model, "train.checkpoint_layers=null").train_peak_bytes
    assert every == pytest.approx(gpu(*model, "train.checkpoint_layers=32").train_peak_bytes)
    off = gpu(*model, "train.gradient_checkpointing=false").train_peak_bytes
    assert off == pytest.approx(peaks[0])


def test_activations_scale_with_tokens_and_the_fused_branch_keeps_less(shape_dirs: Dict[str, Path]) -> None:
    model = ["model=local", f"model.name_or_path={shape_dirs['8b']}", "quant=bnb4", "do_eval=false",
             "train.checkpoint_layers=0", "model.liger=true"]
    # fused branch forced (the auto rule would switch it off for the small step) and one example per row
    # (a packed mask grows with seq^2): then everything a layer keeps is linear in the tokens
    small = gpu(*model, "train.batch_size=1", "train.max_seq_len=2048", "train.fused_lora=true", packed_rows=False)
    large = gpu(*model, "train.batch_size=4", "train.max_seq_len=2048", "train.fused_lora=true", packed_rows=False)
    kept = [next(t.bytes for ph in p.phases if ph.name == "backward" for t in ph.terms
                 if t.name.startswith("activations of un-checkpointed")) for p in (small, large)]
    assert kept[1] == pytest.approx(4 * kept[0])
    fused = gpu(*model, "train.fused_lora=true", "train.max_seq_len=2048", packed_rows=False)
    peft = gpu(*model, "train.fused_lora=false", "train.max_seq_len=2048", packed_rows=False)
    per_layer = (peft.train_peak_bytes - fused.train_peak_bytes) / 32
    # peft's dropout keeps a bool mask and a bf16 copy of every adapted input: 3 bytes per element
    n, h, i = 4 * 2048, 4096, 14336
    assert per_layer == pytest.approx(3 * n * (3 * h + h + 2 * h + i), rel=0.01)


def test_stock_head_logits_versus_chunked_loss(shape_dirs: Dict[str, Path]) -> None:
    model = ["model=local", f"model.name_or_path={shape_dirs['1b']}", "quant=bnb4", "do_eval=false"]
    stock = gpu(*model, "train.fused_ce=false")
    chunked = gpu(*model, "train.fused_ce=true")
    loss = next(t.bytes for ph in stock.phases for t in ph.terms if t.name.startswith("logits and loss"))
    assert loss == 12 * 4 * 512 * 128256  # fp32 log-softmax, its gradient and the result, per token and vocab
    # the chunked loss holds one chunk of 2**27 logits (bf16, fp32 and the cast-back probabilities) instead
    saved = stock.phase_bytes("forward end (loss)") - chunked.phase_bytes("forward end (loss)")
    assert loss - 2**27 * 6 - 2 * 2 * 2048 * 2048 <= saved < loss
    # FSDP2 and ZeRO-3 run the chunked loss too (trainer/fused_loss.py gathers the sharded head for it)
    for sharded in ("fsdp", "zero3"):
        run = gpu(*model, "train.fused_ce=true", f"strategy={sharded}", "launcher=torchrun",
                  "launcher.nproc_per_node=2")
        names = [t.name for ph in run.phases for t in ph.terms]
        assert not any(n.startswith("logits and loss") for n in names), sharded
        assert any(n.startswith("loss: one chunk of logits") for n in names), sharded


# Peak GiB measured on one H200 (torch.cuda.max_memory_allocated, bench/RESULTS.md) for settings today's code
# still runs the same way: item a/b = 8B shape, c/cv = 1B shape, seq 2048, batch 4, bnb4 LoRA r16, liger; all of
# them with the embedding table on the GPU (measured before train.embeddings_on_host, which they set to false).
RECORDED = [
    ("8b", [], False, 9.23, "run 4, a, defaults"),
    ("8b", ["train.fused_lora=false"], False, 9.87, "run 4, a, fused LoRA off"),
    ("8b", ["train.checkpoint_layers=0"], False, 29.65, "run 4, a, ckpt 0/32"),
    ("8b", ["train.checkpoint_layers=8"], False, 24.38, "run 4, a, ckpt 8/32"),
    ("8b", ["train.checkpoint_layers=7"], False, 25.04, "run 4, a, ckpt 7/32"),
    ("8b", [], True, 9.37, "run 4, b, defaults (packed variable lengths)"),
    ("1b", [], False, 3.22, "run 2, c, defaults"),
    ("1b", [], True, 3.31, "run 1, cv, defaults (packed variable lengths)"),
    ("1b", ["train.checkpoint_layers=8"], False, 9.06, "run 1, c, ckpt 8/16"),
    ("1b", ["train.packing=false", "model.upcast_layernorm=false"], False, 3.22, "run 1, c, + liger kernels"),
    ("1b", ["train.packing=false", "model.liger=false", "model.upcast_layernorm=false"], False, 3.81,
     "run 1, c, + bf16 norms (no liger)"),
]


def test_prediction_reproduces_the_recorded_gpu_measurements(shape_dirs: Dict[str, Path]) -> None:
    errors = []
    for shape, extra, packed, measured, where in RECORDED:
        p = gpu("model=local", f"model.name_or_path={shape_dirs[shape]}", "quant=bnb4", "peft=lora",
                "train.max_seq_len=2048", "train.batch_size=4", "do_eval=false", "model.liger=true",
                "train.embeddings_on_host=false", "train.offload_activations=false", *extra, packed_rows=packed)
        error = p.train_peak_bytes / GIB / measured - 1
        errors.append(abs(error))
        assert abs(error) < 0.08, f"{where}: predicted {p.train_peak_bytes / GIB:.2f} GiB, measured {measured}"
    assert statistics.median(errors) < 0.02, errors


# docs/strategies_gpu.md, 2x H200: a 1.06B Llama (hidden 2048, 18 layers, intermediate 5632, 16 heads, vocab
# 32000), bnb4 LoRA r16, batch 4 of packed 512-token rows, liger; peak GiB per GPU (max_memory_allocated over
# the steps) and GiB allocated once the strategy wrapped the model (before the first step).
STRATEGIES_2GPU = {"single": (1.28, 0.747), "ddp": (1.32, 0.79), "fsdp": (1.5, 0.378), "zero3": (2.11, None)}


def test_prediction_reproduces_the_recorded_two_gpu_strategies(tmp_path: Path) -> None:
    config = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 18,
              "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for strategy, (peak, wrapped) in STRATEGIES_2GPU.items():
        launch = [] if strategy == "single" else ["launcher=torchrun", "launcher.nproc_per_node=2"]
        # Measured when FSDP and ZeRO-3 still ran the stock head (the chunked loss came to them later).
        head = ["train.fused_ce=false"] if strategy in ("fsdp", "zero3") else []
        p = gpu("model=local", f"model.name_or_path={tmp_path}", "quant=bnb4", "train.max_seq_len=512",
                "train.batch_size=4", "do_eval=false", "model.liger=true", f"strategy={strategy}", *launch, *head,
                "train.embeddings_on_host=false")  # measured with the table on the GPU
        assert p.train_peak_bytes / GIB == pytest.approx(peak, rel=0.08), strategy
        if wrapped is not None:
            before_step = sum(t.bytes for t in p.static if not t.name.startswith(("optimizer", "DeepSpeed", "ZeRO")))
            assert before_step / GIB == pytest.approx(wrapped, rel=0.05), strategy


def test_docs_memory_shows_the_current_predictions_for_the_recorded_rows(shape_dirs: Dict[str, Path]) -> None:
    doc = (REPO / "docs" / "memory.md").read_text()
    for shape, extra, packed, measured, where in RECORDED:
        p = gpu("model=local", f"model.name_or_path={shape_dirs[shape]}", "quant=bnb4", "peft=lora",
                "train.max_seq_len=2048", "train.batch_size=4", "do_eval=false", "model.liger=true",
                "train.embeddings_on_host=false", "train.offload_activations=false", *extra, packed_rows=packed)
        row = next(line for line in doc.splitlines() if line.startswith(f"| {where} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4:6] == [f"{measured:.2f}", f"{p.train_peak_bytes / GIB:.2f}"], \
            f"docs/memory.md is stale for {where}: the model now predicts {p.train_peak_bytes / GIB:.2f} GiB"


def test_bnb8_keeps_the_outlier_columns_of_down_proj_a_second_time(shape_dirs: Dict[str, Path]) -> None:
    """MatMul8bitLt keeps the input columns over LLM.int8's threshold besides the input (subA): a random-weight
    8B checkpoint has one in every down_proj column (docs/memory.md, Known limits), a pretrained model few."""
    cfg = compose(["model=local", f"model.name_or_path={shape_dirs['8b']}", "quant=bnb8", "do_eval=false",
                   "train.max_seq_len=2048", "train.batch_size=4"])
    none, every = (memory.predict(cfg, device="cuda", int8_outlier_share=s) for s in (0.0, 1.0))
    default = memory.predict(cfg, device="cuda")
    column_copy = 32 * 2 * (4 * 2048) * 14336  # every layer checkpointed: each keeps its down_proj input's copy
    loss_phase = "forward end (loss)"
    assert every.phase_bytes(loss_phase) - none.phase_bytes(loss_phase) == pytest.approx(column_copy, rel=1e-6)
    assert default.phase_bytes(loss_phase) - none.phase_bytes(loss_phase) == \
        pytest.approx(memory.INT8_OUTLIER_SHARE * column_copy, rel=1e-6)
    assert any("assumed 5% of them" in n for n in default.assumptions)
    bnb4 = compose(["model=local", f"model.name_or_path={shape_dirs['8b']}", "quant=bnb4", "do_eval=false"])
    assert memory.predict(bnb4, device="cuda", int8_outlier_share=1.0).train_peak_bytes == \
        memory.predict(bnb4, device="cuda").train_peak_bytes  # only bnb 8-bit keeps such a copy


def test_eval_holds_one_chunk_of_logits_with_the_chunked_loss_and_the_whole_batch_without(
        shape_dirs: Dict[str, Path]) -> None:
    model = ["model=local", f"model.name_or_path={shape_dirs['8b']}", "quant=bnb4", "train.max_seq_len=2048",
             "train.eval_batch_size=8", "train.embeddings_on_host=false"]  # the head held, not copied in
    stock = gpu(*model, "train.fused_ce=false")
    assert stock.peak_phase.name == "eval forward"  # 16k tokens of bf16 + fp32 logits and fp32 log-softmax
    assert stock.phase_bytes("eval forward") - stock.static_bytes > 10 * 8 * 2048 * 128256
    assert gpu(*model, "train.fused_ce=false", "train.eval_batch_size=1").peak_phase.name != "eval forward"
    assert all(ph.name != "eval forward" for ph in gpu(*model, "train.fused_ce=false", "do_eval=false").phases)
    chunked = gpu(*model)  # the default: the chunked loss evaluates too (trainer/fused_loss.py)
    assert chunked.peak_phase.name != "eval forward"
    eval_loss = chunked.phase_bytes("eval forward") - chunked.static_bytes
    assert eval_loss < 2 * 8 * 2048 * 4096 + 2**27 * 6 + 3 * 2 * 8 * 2048 * 14336 + 2**30  # no whole-batch logits


# ---- checkpoint_layers=auto and the rules -------------------------------------------------------------

def test_auto_picks_the_most_uncheckpointed_layers_that_fit(shape_dirs: Dict[str, Path]) -> None:
    model = ["model=local", f"model.name_or_path={shape_dirs['8b']}", "quant=bnb4", "do_eval=false",
             "model.liger=true", "train.max_seq_len=2048"]
    for target in (16, 24, 40, 80):
        p = gpu(*model, "train.checkpoint_layers=auto", f"train.gpu_mem_gib={target}")
        count = p.checkpointed
        assert p.auto and f"{count} of 32 layers checkpointed" in p.auto
        budget = 0.9 * target * GIB
        assert gpu(*model, f"train.checkpoint_layers={count}", f"train.gpu_mem_gib={target}").needed_bytes <= budget
        if count > 0:
            assert gpu(*model, f"train.checkpoint_layers={count - 1}",
                       f"train.gpu_mem_gib={target}").needed_bytes > budget
        assert p.checkpoint_layers == (count if count < 32 else None)
    assert gpu(*model, "train.checkpoint_layers=auto", "train.gpu_mem_gib=80").checkpointed == 0
    unknown = memory.predict(compose([*model, "train.checkpoint_layers=auto"]), device="cpu")
    assert unknown.checkpointed == 32 and "no GPU memory known" in unknown.auto


def rule_ids(*overrides: str) -> Dict[str, set]:
    report = validate(compose(list(overrides)))
    return {"errors": {v.rule_id for v in report.errors}, "warnings": {v.rule_id for v in report.warnings}}


def test_memory_rule_fires_above_the_gpu_warns_within_10_percent_and_not_without_a_target(
        shape_dirs: Dict[str, Path]) -> None:
    model = ["model=local", f"model.name_or_path={shape_dirs['8b']}", "quant=bnb4", "do_eval=false",
             "model.liger=true"]
    needed = gpu(*model, "train.gpu_mem_gib=80").needed_bytes / GIB
    assert "memory.fits" in rule_ids(*model, f"train.gpu_mem_gib={needed * 0.97:.3f}")["errors"]
    tight = rule_ids(*model, f"train.gpu_mem_gib={needed * 1.05:.3f}")
    assert "memory.fits" not in tight["errors"] and "memory.tight" in tight["warnings"]
    roomy = rule_ids(*model, f"train.gpu_mem_gib={needed * 1.2:.3f}")
    assert not ({"memory.fits", "memory.tight"} & (roomy["errors"] | roomy["warnings"]))
    none = rule_ids(*model)  # this machine has no GPU and no memory was given: nothing to compare with
    assert not any(r.startswith("memory.") for r in none["errors"] | none["warnings"])


def test_the_rule_sentence_names_peak_target_largest_terms_and_fixes(shape_dirs: Dict[str, Path]) -> None:
    cfg = compose(["model=local", f"model.name_or_path={shape_dirs['8b']}", "quant=bnb4", "do_eval=false",
                   "train.checkpoint_layers=0", "train.max_seq_len=2048", "train.gpu_mem_gib=24",
                   "model.liger=true"])
    [violation] = [v for v in validate(cfg).errors if v.rule_id == "memory.fits"]
    p = memory.predict(cfg)
    assert f"{p.needed_bytes / GIB:.1f} GiB per GPU" in violation.message
    assert "24 GiB GPU (train.gpu_mem_gib)" in violation.message
    assert "activations of un-checkpointed layers" in violation.message
    assert "checkpoint all layers (train.checkpoint_layers=null)" in violation.fix
    assert "\n" not in violation.line()
    # each fix named with its predicted peak, and each one really fits
    assert violation.fix.startswith("any one of: ")
    clauses = violation.fix.removeprefix("any one of: ").split(" (python -m trainer.memory")[0].split("; ")
    for clause in clauses:
        gib = float(clause.rsplit("(", 1)[1].split(" GiB")[0])
        assert gib <= 0.9 * 24, clause


def test_target_memory_comes_from_the_gpus_slurm_or_by_hand(monkeypatch: pytest.MonkeyPatch,
                                                            shape_dirs: Dict[str, Path]) -> None:
    import trainer.env

    model = ["model=local", f"model.name_or_path={shape_dirs['1b']}"]
    monkeypatch.setattr(trainer.env, "accelerators", lambda: Accelerators(2, True, (79.3, 139.8)))
    detected = memory.predict(compose(model))
    assert detected.device == "cuda" and detected.target_gib == pytest.approx(79.3)
    assert detected.target_source.startswith("detected")
    assert memory.predict(compose([*model, "train.gpu_mem_gib=24"])).target_gib == 24
    slurm = compose([*model, "launcher=slurm", "launcher.slurm.gpu_mem_gib=40", "launcher.slurm.gpus_per_node=4"])
    p = memory.predict(slurm)
    assert (p.target_gib, p.target_source, p.world) == (40, "launcher.slurm.gpu_mem_gib", 4)
    assert memory.predict(compose([*model, "launcher=slurm"])).target_gib is None  # not this machine's GPUs


def test_nvidia_smi_memory_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    import trainer.env

    class Done:
        stdout = "9.0, 143771\n9.0, 143771\n"

    monkeypatch.setattr(trainer.env.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    trainer.env.accelerators.cache_clear()
    try:
        acc = trainer.env.accelerators()
    finally:
        trainer.env.accelerators.cache_clear()
    assert acc.gpus == 2 and acc.bf16 and acc.memory_gib == pytest.approx((140.4, 140.4), abs=0.05)


@pytest.mark.parametrize("value, ok", [("null", True), ("0", True), ("8", True), ("auto", True), ("-1", False),
                                       ("2.5", False), ("true", False), ("most", False)])
def test_checkpoint_layers_accepts_null_a_count_or_auto(value: str, ok: bool) -> None:
    assert ("train.checkpoint_layers" not in rule_ids(f"train.checkpoint_layers={value}")["errors"]) == ok


def test_bad_gpu_memory_and_unknown_shapes() -> None:
    assert "train.gpu_mem_gib" in rule_ids("train.gpu_mem_gib=0")["errors"]
    found = rule_ids("model=local", "model.name_or_path=org/not-cached", "train.gpu_mem_gib=80")
    assert "memory.unknown" in found["warnings"] and "memory.fits" not in found["errors"]
    p = memory.predict(compose(["model=local", "model.name_or_path=org/not-cached"]))
    assert not p.known and "unknown" in p.reason and p.to_dict()["predicted"] is False


def test_shapes_come_from_local_dirs_the_hf_cache_and_shipped_presets(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = tmp_path / "hub" / "models--org--cached" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama", **SHAPES["1b"]}))
    (tmp_path / "hub" / "models--org--cached" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--cached" / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    shape, source = memory.find_shape(compose(["model=local", "model.name_or_path=org/cached"]))
    assert shape.layers == 16 and "Hugging Face cache" in source
    for preset, layers, hidden, vocab in (("llama3_8b", 32, 4096, 128256), ("llama3_70b", 80, 8192, 128256),
                                          ("qwen2_5_7b", 28, 3584, 152064), ("mistral_7b", 32, 4096, 32768)):
        shape, source = memory.find_shape(compose([f"model={preset}"]))
        assert (shape.layers, shape.hidden, shape.vocab) == (layers, hidden, vocab) and "shipped" in source
    assert memory.find_shape(compose(["model=qwen2_5_7b"]))[0].qkv_bias
    tiny, source = memory.find_shape(compose([]))
    from trainer.tiny import ensure_tiny_model

    built = json.loads((ensure_tiny_model(compose([]).model.tiny) / "config.json").read_text())
    assert (tiny.vocab, tiny.hidden, tiny.layers) == (built["vocab_size"], built["hidden_size"],
                                                      built["num_hidden_layers"])


def test_fused_lora_threshold_matches_the_runtime_rule() -> None:
    pytest.importorskip("torch")
    from trainer import lora_fused

    assert memory.FUSED_LORA_MIN_WORK == lora_fused.MIN_TOKENS_X_HIDDEN
    from trainer import fused_loss, speed

    assert memory.TORCH_CE_CHUNK_ELEMENTS == fused_loss.CHUNK_ELEMENTS
    assert memory.LIGER_MODEL_TYPES == speed.LIGER_MODEL_TYPES


# ---- total and fast over random compositions ----------------------------------------------------------

def random_compositions(count: int, seed: int = 0) -> List[Any]:
    groups = {g: sorted(p.stem for p in (REPO / "conf" / g).glob("*.yaml"))
              for g in ("model", "quant", "peft", "strategy", "launcher")}
    options = [(g, o) for g, names in groups.items() for o in names]
    composed = compose_all([[f"{g}={o}"] + (["model.name_or_path=/nowhere"] if (g, o) == ("model", "local")
                                              else []) for g, o in options])
    nodes = {key: cfg for key, cfg in zip(options, composed)}
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        model = rng.choice(groups["model"])
        cfg = nodes[("model", model)].copy()
        for group in ("quant", "peft", "strategy", "launcher"):
            cfg[group] = nodes[(group, rng.choice(groups[group]))][group]
        t = cfg.train
        t.batch_size = rng.choice([1, 2, 4, 16])
        t.eval_batch_size = rng.choice([1, 8])
        t.max_seq_len = rng.choice([128, 2048, 8192, 32768])
        t.checkpoint_layers = rng.choice([None, 0, 3, 8, 200, "auto"])
        t.gpu_mem_gib = rng.choice([None, 8.0, 24.0, 80.0, 141.0])
        t.fused_lora = rng.choice([None, True, False])
        t.fused_ce, t.packing = rng.choice([True, False]), rng.choice([True, False])
        t.gradient_checkpointing = rng.choice([True, True, False])
        t.optim = rng.choice(["adamw_torch", "paged_adamw_8bit", "sgd", "adafactor", "lion_32bit", "ademamix"])
        cfg.model.liger = rng.choice([None, True, False])
        cfg.model.attn_implementation = rng.choice(["sdpa", "eager", "flash_attention_2"])
        cfg.model.upcast_layernorm = rng.choice([True, False])
        cfg.peft.r = rng.choice([0, 8, 64])
        cfg.peft.dropout = rng.choice([0.0, 0.05])
        cfg.peft.target_modules = rng.choice([["all-linear"], ["q_proj", "v_proj"], ["nonexistent"]])
        cfg.quant.bits = rng.choice([cfg.quant.bits, 2, 3, 8])
        cfg.quant.group_size = rng.choice([64, 128])
        cfg.do_eval, cfg.do_train = rng.choice([True, False]), rng.choice([True, True, False])
        cfg.launcher.nproc_per_node = rng.choice(["auto", "1", "2", "8"])
        cfg.launcher.slurm.gpus_per_node = rng.choice([0, 1, 8])
        cfg.launcher.slurm.gpu_mem_gib = rng.choice([None, 80.0])
        cfg.strategy.offload_params = rng.choice([False, True])
        out.append(cfg)
    return out


def test_700_random_compositions_never_crash_and_validate_stays_fast() -> None:
    cfgs = random_compositions(700)
    timings = []
    fired = 0
    for index, cfg in enumerate(cfgs):
        started = time.perf_counter()
        report = validate(cfg)
        timings.append(time.perf_counter() - started)
        fired += any(v.rule_id == "memory.fits" for v in report.errors)
        assert not any("internal error" in v.line() for v in report.errors + report.warnings), index
        p = memory.predict(cfg)
        assert not p.reason.startswith("internal error"), (index, p.reason)
        json.dumps(p.to_dict())
        if p.known:
            assert math.isfinite(p.needed_bytes) and p.peak_bytes >= 0, index
            assert p.peak_bytes > 0 or not cfg.do_train, index
            assert all(ph.bytes >= 0 for ph in p.phases), index
            assert p.phases or not (cfg.do_train or cfg.do_eval), index
    assert fired > 50  # the grid does reach the rule, with its message and fixes computed
    assert statistics.median(timings) < 0.05 and max(timings) < 1.0, (statistics.median(timings), max(timings))
