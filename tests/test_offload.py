"""train.offload_activations (trainer/offload.py): what decoder layers keep for backward, in host memory.

On CPU the hooks run in simulate mode (a separate CPU copy stands in for pinned host memory, no streams): what
is packed is exactly each checkpointed layer's input, and everything an un-checkpointed layer saves except its
parameters and shared keyword tensors; everything comes back, and the gradients are the ones without
offloading, bit for bit. The CUDA path (side stream, prefetch, the memory it saves) is the
gpu-marked test at the end, run on the GPU machine.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Set, Tuple, Union

import pytest
import torch

from tests.conftest import only_run_dir, run_cli
from trainer import memory
from trainer.compose import compose
from trainer.offload import ActivationOffloader, offload_checkpointed_layers, spread
from trainer.schema import TinyArch
from trainer.tiny import ensure_tiny_model


@pytest.fixture(scope="module")
def tiny_model_dir() -> Path:
    return ensure_tiny_model(TinyArch())


def _grads(model_dir: Path, offloader: Any = None, keep: int = 99, plain: Union[bool, int] = False,
           compiled: bool = False) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Set[int]]:
    """The loss, the gradients, and the storages of the model's parameters."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    if compiled:  # as trainer/speed.py does: before the Trainer switches checkpointing on and offload wraps
        from trainer import compile_layers

        assert compile_layers.install(model) == TinyArch().num_hidden_layers
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < keep  # as trainer/speed.py's partial checkpointing does
    if offloader is not None:
        wrapped = offload_checkpointed_layers(model, offloader, plain_layers=plain)
        checkpointed = min(keep, len(layers))
        offloaded = (len(layers) - checkpointed) if plain is True else min(int(plain), len(layers) - checkpointed)
        assert wrapped == checkpointed + offloaded
    ids = torch.randint(5, 800, (2, 24), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            {p.untyped_storage().data_ptr() for p in model.parameters()})


@pytest.mark.parametrize("keep", [99, 1], ids=["every-layer", "first-layer-only"])
def test_offloaded_inputs_come_back_and_give_the_same_gradients(tiny_model_dir: Path, keep: int) -> None:
    loss, grads, _ = _grads(tiny_model_dir, keep=keep)
    offloader = ActivationOffloader(min_bytes=0, simulate=True)
    offloaded_loss, offloaded_grads, _ = _grads(tiny_model_dir, offloader, keep=keep)
    assert torch.equal(offloaded_loss, loss)
    assert set(offloaded_grads) == set(grads)
    for name, grad in grads.items():
        assert torch.equal(offloaded_grads[name], grad), name
    arch = TinyArch()
    # one saved tensor per checkpointed layer, its hidden states (batch x seq x hidden), all unpacked by backward
    assert len(offloader.saved) == min(keep, arch.num_hidden_layers)
    assert all(s.host.numel() == 2 * 24 * arch.hidden_size for s in offloader.saved)
    assert all(s.unpacked for s in offloader.saved)


@pytest.mark.parametrize("keep", [1, 0], ids=["one-checkpointed", "none-checkpointed"])
def test_un_checkpointed_layers_offload_everything_they_save_and_train_the_same(tiny_model_dir: Path,
                                                                                keep: int) -> None:
    loss, grads, _ = _grads(tiny_model_dir, keep=keep)
    offloader = ActivationOffloader(min_bytes=0, simulate=True)
    offloaded_loss, offloaded_grads, parameters = _grads(tiny_model_dir, offloader, keep=keep, plain=True)
    assert torch.equal(offloaded_loss, loss)
    assert set(offloaded_grads) == set(grads)
    for name, grad in grads.items():
        assert torch.equal(offloaded_grads[name], grad), name
    arch = TinyArch()
    layer_input = 2 * 24 * arch.hidden_size
    assert len(offloader.groups) == arch.num_hidden_layers  # one group per layer call, in forward order
    checkpointed, plain = offloader.groups[:keep], offloader.groups[keep:]
    assert all(len(g.items) == 1 and g.items[0].host.numel() == layer_input for g in checkpointed)
    for group in plain:
        # the norms' inputs, q/k/v, attention output, gate and up...: several storages, each copied once
        assert len(group.items) >= 5
        assert sum(i.host.numel() for i in group.items) > 4 * layer_input
        assert len({i.host.data_ptr() for i in group.items}) == len(group.items)
    assert all(s.unpacked and s.users == 0 for s in offloader.saved)
    assert not {i.source for i in offloader.saved} & parameters  # no weight went to the host


@pytest.mark.slow
def test_compiled_layers_offload_what_their_graph_saves_and_train_the_same(tiny_model_dir: Path) -> None:
    """train.compile with offload: the compiled layer's forward saves its activations through the same hooks
    (AOTAutograd saves them on its autograd function's context), so one checkpointed layer offloads its input and
    the three others everything their graph keeps; the gradients are those of the compiled run without offload."""
    from torch._dynamo.utils import counters

    counters.clear()
    loss, grads, _ = _grads(tiny_model_dir, keep=1, compiled=True)
    offloader = ActivationOffloader(min_bytes=0, simulate=True)
    offloaded_loss, offloaded_grads, parameters = _grads(tiny_model_dir, offloader, keep=1, plain=True,
                                                         compiled=True)
    assert torch.equal(offloaded_loss, loss)
    assert set(offloaded_grads) == set(grads) and grads
    for name, grad in grads.items():
        assert torch.equal(offloaded_grads[name], grad), name
    assert sum(counters["graph_break"].values()) == 0
    layer_input = 2 * 24 * TinyArch().hidden_size
    assert len(offloader.groups) == TinyArch().num_hidden_layers
    assert [i.host.numel() for i in offloader.groups[0].items] == [layer_input]
    for group in offloader.groups[1:]:
        assert sum(i.host.numel() for i in group.items) > 4 * layer_input
    assert all(s.unpacked and s.users == 0 for s in offloader.saved)
    assert not {i.source for i in offloader.saved} & parameters


def test_layers_not_among_offload_layers_keep_their_activations_on_the_gpu_and_train_the_same(
        tiny_model_dir: Path) -> None:
    """train.offload_layers=1 with one layer checkpointed: layer 0 recomputes, one of the other three offloads
    whole (the middle one: spread among them), the other two are left alone (nothing of theirs is packed)."""
    loss, grads, _ = _grads(tiny_model_dir, keep=1)
    offloader = ActivationOffloader(min_bytes=0, simulate=True)
    offloaded_loss, offloaded_grads, _ = _grads(tiny_model_dir, offloader, keep=1, plain=1)
    assert torch.equal(offloaded_loss, loss)
    for name, grad in grads.items():
        assert torch.equal(offloaded_grads[name], grad), name
    assert TinyArch().num_hidden_layers > 2
    layer_input = 2 * 24 * TinyArch().hidden_size
    assert len(offloader.groups) == 2  # the checkpointed layer and the one offloaded whole; no group for the rest
    assert [g.items[0].host.numel() for g in offloader.groups[:1]] == [layer_input]
    assert sum(i.host.numel() for i in offloader.groups[1].items) > 4 * layer_input


def test_the_layers_offloaded_whole_are_spread_among_those_that_keep_their_activations(
        tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from trainer.offload import decoder_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index == 0
    assert offload_checkpointed_layers(model, ActivationOffloader(simulate=True), plain_layers=1) == 2
    # layer 0 checkpoints; of layers 1-3 the middle one offloads whole, the two around it keep theirs
    assert [bool(getattr(layer, "_qforge_offloaded", False)) for layer in layers] == [True, False, True, False]


def test_the_checkpointed_layers_are_spread_among_the_offloaded_ones() -> None:
    assert spread(16, 32) == [False, True] * 16
    assert spread(1, 5) == [False, False, True, False, False]
    assert spread(0, 4) == [False] * 4 and spread(4, 4) == [True] * 4 and spread(9, 4) == [True] * 4
    for keep in range(1, 33):
        chosen = spread(keep, 32)
        assert sum(chosen) == keep
        # no run of offloaded layers longer than one share of the stack
        runs = "".join("c" if c else "o" for c in chosen).split("c")
        assert max(len(r) for r in runs) <= -(-32 // keep)


def test_small_tensors_stay_where_they_are() -> None:
    offloader = ActivationOffloader(min_bytes=1 << 20, simulate=True)
    small = torch.ones(8)
    assert offloader.pack(small) is small and offloader.unpack(small) is small and not offloader.saved


def test_offload_is_refused_on_cpu(output_root: Path) -> None:
    on_cpu = run_cli("train.offload_activations=true", f"output_root={output_root}")
    assert on_cpu.returncode == 1 and "Traceback" not in on_cpu.stderr  # a UserError at plan time
    assert "this run trains on CPU" in on_cpu.stderr and not output_root.exists()


LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}


def test_the_memory_model_keeps_two_offloaded_inputs_on_the_gpu(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    base = ["model=local", f"model.name_or_path={tmp_path}", "train.max_seq_len=2048", "train.batch_size=4",
            "do_eval=false"]
    layer_input = 2 * 4 * 2048 * 4096
    moved_peaks = {}
    for quant in ("bnb4", "bnb8"):
        plain = memory.predict(compose([*base, f"quant={quant}"]), device="cuda")
        moved = memory.predict(compose([*base, f"quant={quant}", "train.offload_activations=true"]), device="cuda")
        saved = plain.phase_bytes("forward end (loss)") - moved.phase_bytes("forward end (loss)")
        assert saved == pytest.approx(30 * layer_input)  # 32 layers' inputs, 2 of them on the GPU at a time
        assert any("pinned host memory" in a for a in moved.assumptions)
        moved_peaks[quant] = moved.phase_bytes("forward end (loss)")
    # bnb 8-bit keeps its linears' inputs on its autograd ctx, which no saved-tensor hook can move
    assert moved_peaks["bnb8"] > moved_peaks["bnb4"] + 32 * layer_input


def test_the_memory_model_keeps_two_offloaded_un_checkpointed_layers_on_the_gpu(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    base = ["model=local", f"model.name_or_path={tmp_path}", "train.max_seq_len=2048", "train.batch_size=4",
            "do_eval=false", "quant=bnb4", "train.checkpoint_layers=8"]
    kept = memory.predict(compose(base), device="cuda")
    moved = memory.predict(compose([*base, "train.offload_activations=true"]), device="cuda")

    def plain_layers(prediction: Any) -> float:
        phase = next(p for p in prediction.phases if p.name == "forward end (loss)")
        return next(t.bytes for t in phase.terms if "un-checkpointed" in t.name)

    # 24 un-checkpointed layers: all on the GPU without offload, 2 at a time with it
    assert plain_layers(moved) == pytest.approx(plain_layers(kept) * 2 / 24)
    assert any("un-checkpointed layers' activations" in a and "pinned host memory" in a for a in moved.assumptions)
    assert moved.phase_bytes("forward end (loss)") < kept.phase_bytes("forward end (loss)") - 20 * 2**30


def _auto_8b(tmp_path: Path, gpu_mem_gib: float) -> Any:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    return memory.predict(compose(
        ["model=local", f"model.name_or_path={tmp_path}", "train.max_seq_len=2048", "train.batch_size=4",
         "do_eval=false", "quant=bnb4", "train.checkpoint_layers=auto", "train.offload_activations=true",
         f"train.gpu_mem_gib={gpu_mem_gib}", "train.host_mem_gib=512",
         "train.embeddings_on_host=false"]), device="cuda")  # the splits below are for the table on the GPU


def test_the_offload_ladder_needs_no_more_memory_at_each_rung(tmp_path: Path) -> None:
    ladder = memory.offload_ladder(32)
    assert ladder[0] == (0, 0) and ladder[-1] == (32, 0) and len(set(ladder)) == len(ladder)
    assert all(c + o <= 32 and o <= 16 for c, o in ladder)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    _, x = memory.predict_with_inputs(compose(
        ["model=local", f"model.name_or_path={tmp_path}", "train.max_seq_len=2048", "train.batch_size=4",
         "do_eval=false", "quant=bnb4", "train.offload_activations=true", "train.checkpoint_layers=8"]),
        device="cuda")
    assert x is not None
    needed = [memory.predict_inputs(dataclasses.replace(x, checkpoint_layers=c, offload_layers=o)).needed_bytes
              for c, o in ladder]
    assert all(later <= earlier + 1 for earlier, later in zip(needed, needed[1:]))
    assert needed[0] > needed[-1] + 20 * 2**30  # every layer kept vs every layer checkpointed


def test_auto_under_offload_keeps_what_fits_then_offloads_then_recomputes(tmp_path: Path) -> None:
    roomy = _auto_8b(tmp_path, 80)  # everything fits on the GPU: no copies, no recompute
    assert (roomy.checkpoint_layers, roomy.offload_layers) == (0, 0) and "32 of 32 layers keep" in roomy.auto
    middle = _auto_8b(tmp_path, 20)  # some kept, half the stack offloaded, the rest recomputed
    kept = 32 - middle.checkpoint_layers - middle.offload_layers
    assert middle.offload_layers == 16 and 0 < kept < 16 and middle.checkpoint_layers == 16 - kept
    assert middle.needed_bytes <= 0.9 * 20 * 2**30
    assert _auto_8b(tmp_path, 19).checkpoint_layers > middle.checkpoint_layers  # less memory, more recompute
    tight = _auto_8b(tmp_path, 12)  # nothing kept: half recomputes, half offloads (bench/RESULTS.md, run 6)
    assert (tight.checkpoint_layers, tight.offload_layers) == (16, 16)
    assert "16 of 32 layers offload all their" in tight.auto
    # a card too small even for everything checkpointed keeps the usual refusal
    tiny = _auto_8b(tmp_path, 4)
    assert tiny.checkpoint_layers is None and "even with every layer checkpointed" in tiny.auto


def test_the_memory_model_counts_the_layers_that_keep_their_activations(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    base = ["model=local", f"model.name_or_path={tmp_path}", "train.max_seq_len=2048", "train.batch_size=4",
            "do_eval=false", "quant=bnb4", "train.checkpoint_layers=8", "train.offload_activations=true"]
    every = memory.predict(compose(base), device="cuda")
    some = memory.predict(compose([*base, "train.offload_layers=10"]), device="cuda")
    kept_layers = memory.predict(compose(["model=local", f"model.name_or_path={tmp_path}", "train.max_seq_len=2048",
                                          "train.batch_size=4", "do_eval=false", "quant=bnb4",
                                          "train.checkpoint_layers=8"]), device="cuda")

    def plain_layers(prediction: Any) -> float:
        phase = next(p for p in prediction.phases if p.name == "forward end (loss)")
        return next(t.bytes for t in phase.terms if "un-checkpointed" in t.name)

    per_layer = plain_layers(kept_layers) / 24
    assert plain_layers(some) == pytest.approx((14 + 2) * per_layer)  # 14 kept, 2 of the 10 offloaded in flight
    assert plain_layers(every) == pytest.approx(2 * per_layer)
    assert some.offload_layers == 10 and every.offload_layers == 24
    assert some.host_bytes == pytest.approx(every.host_bytes - 14 * per_layer)  # bnb4 keeps nothing on a ctx


@pytest.mark.parametrize("overrides, problem", [
    (["train.offload_layers=4"], "train.offload_activations is not true"),
    (["train.offload_activations=true", "train.offload_layers=4", "train.checkpoint_layers=auto"],
     "chooses how many layers offload as well"),
    (["train.offload_activations=true", "train.offload_layers=4"], "every decoder layer is checkpointed"),
    (["train.offload_activations=true", "train.offload_layers=-1", "train.checkpoint_layers=1"],
     "must be null or a number of layers"),
    (["train.offload_activations=true", "train.offload_layers=9", "train.checkpoint_layers=1"],
     "is more than the"),
])
def test_offload_layers_that_cannot_be_honoured_are_refused(output_root: Path, overrides: List[str],
                                                            problem: str) -> None:
    done = run_cli(*overrides, "dry_run=true", f"output_root={output_root}")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "[train.offload_layers]" in done.stderr and problem in done.stderr
    assert not output_root.exists()


@pytest.mark.gpu
@pytest.mark.parametrize("layers, offload_only", [([], []), (["train.checkpoint_layers=1"], []),
                                                  (["model.tiny.num_hidden_layers=8", "train.checkpoint_layers=1"],
                                                   ["train.offload_layers=5"]),
                                                  (["train.compile=true", "train.checkpoint_layers=1"], [])],
                         ids=["checkpointed", "mostly-offloaded", "one-kept", "compiled-mostly-offloaded"])
def test_offload_on_gpu_trains_the_same_in_less_memory(output_root: Path, layers: List[str],
                                                       offload_only: List[str]) -> None:
    """On CUDA: the same losses as without offloading, and a lower peak (the side stream and prefetch path);
    with one layer of four checkpointed, the other three offload everything they save; with one of eight
    checkpointed, five offload everything and two keep their activations on the GPU (with four layers, two
    offloaded ones would both be in flight at the peak, as the memory model counts them: no saving to see);
    and under train.compile, where what is offloaded is what the compiled graph saves (both runs compiled)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    common = ["train.max_steps=6", "train.logging_steps=1", "do_eval=false", "train.max_seq_len=512",
              "train.batch_size=8", "train.lr=1e-3", "train.warmup_ratio=0", "peft.dropout=0", *layers]
    results = {}
    for offload in ("false", "true"):
        out = output_root / offload
        done = run_cli(*common, f"train.offload_activations={offload}", *(offload_only if offload == "true" else []),
                       f"output_root={out}", env={"CUDA_VISIBLE_DEVICES": "0"})
        assert done.returncode == 0, done.stderr[-3000:]
        if offload == "true" and offload_only:  # the split the plan asked for is the one the hooks made
            assert "5 all their saved activations (no recompute), 2 keep theirs on the GPU" in done.stderr
        results[offload] = json.loads((only_run_dir(out) / "metrics.json").read_text())
    losses = {k: [e["loss"] for e in m["log_history"] if "loss" in e] for k, m in results.items()}
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-3)
    assert results["true"]["peak_memory_bytes"] < results["false"]["peak_memory_bytes"]


def _offloaded_8b(tmp_path: Path, *extra: str) -> List[str]:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    return ["model=local", f"model.name_or_path={tmp_path}", "quant=bnb4", "train.max_seq_len=2048",
            "train.batch_size=4", "do_eval=false", "train.gpu_mem_gib=12", "train.offload_activations=true",
            "train.checkpoint_layers=auto", "train.embeddings_on_host=false", *extra]  # activations' pinned bytes only


def test_offload_that_would_not_fit_in_host_memory_is_refused_before_anything_runs(tmp_path: Path,
                                                                                    output_root: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    done = run_cli(*_offloaded_8b(model_dir, "train.host_mem_gib=8", "train.checkpoint_layers=16"), "dry_run=true",
                   f"output_root={output_root}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "[memory.host_offload]" in done.stderr and "pinned host memory" in done.stderr
    assert "train.checkpoint_layers=null (only the layer inputs go to the host" in done.stderr
    assert not output_root.exists()


def test_the_host_check_counts_every_process_of_a_node(tmp_path: Path) -> None:
    from trainer.memory.host import ranks_per_node
    from trainer.memory.rules import _host_does_not_fit

    split = "train.checkpoint_layers=16"  # the other 16 offloaded whole
    one = compose(_offloaded_8b(tmp_path, "train.host_mem_gib=64", split))
    per_gpu = memory.predict(one).host_bytes
    assert 4 * 2**30 < per_gpu < 32 * 2**30  # 16 layers offloaded whole, 16 inputs
    assert not _host_does_not_fit(one)
    eight = compose(_offloaded_8b(tmp_path, "train.host_mem_gib=64", "launcher=torchrun",
                                  "launcher.nproc_per_node=8", "strategy=ddp", split))
    assert ranks_per_node(eight) == 8 and _host_does_not_fit(eight)
    # auto counts the node's host memory too: with 8 processes it offloads fewer layers whole, and fits
    auto = memory.predict(compose(_offloaded_8b(tmp_path, "train.host_mem_gib=64", "launcher=torchrun",
                                                "launcher.nproc_per_node=8", "strategy=ddp")))
    assert auto.host_bytes * 8 <= 0.9 * 64 * 2**30 < per_gpu * 8
    assert auto.offload_layers < 16 and "pinned host memory" in auto.auto
    assert not _host_does_not_fit(compose(_offloaded_8b(tmp_path, "train.host_mem_gib=64", "launcher=torchrun",
                                                        "launcher.nproc_per_node=8", "strategy=ddp")))
    # with every layer checkpointed only the inputs go to the host: 8 x 2 GiB fits in 64 GiB
    inputs_only = compose(_offloaded_8b(tmp_path, "train.host_mem_gib=64", "launcher=torchrun",
                                        "launcher.nproc_per_node=8", "strategy=ddp", "train.checkpoint_layers=null"))
    assert memory.predict(inputs_only).host_bytes == pytest.approx(32 * 2 * 4 * 2048 * 4096)
    assert not _host_does_not_fit(inputs_only)
    # nothing offloaded, nothing checked
    assert memory.predict(compose([*_offloaded_8b(tmp_path), "train.offload_activations=false"])).host_bytes == 0


def test_host_memory_must_be_positive(output_root: Path) -> None:
    done = run_cli("train.host_mem_gib=0", "dry_run=true", f"output_root={output_root}")
    assert done.returncode == 2 and "[train.host_mem_gib]" in done.stderr and "Traceback" not in done.stderr


def _slurm_8b(tmp_path: Path, *extra: str) -> List[str]:
    """An 8B-shaped run planned for one GPU of a Slurm node (the plan is for CUDA, though this machine has none)."""
    import shutil

    from trainer.assets import __file__ as assets_init

    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(assets_init).parent / "tokenizer" / name, tmp_path / name)
    return ["model=local", f"model.name_or_path={tmp_path}", "quant=bnb4", "train.max_seq_len=2048",
            "train.batch_size=4", "do_eval=false", "launcher=slurm", "launcher.slurm.gpus_per_node=1",
            "train.offload_activations=true", *extra]


def test_the_plan_carries_the_split_auto_chose_to_the_ranks(tmp_path: Path) -> None:
    from trainer.plan import build_plan

    plan = build_plan(compose(_slurm_8b(tmp_path, "train.checkpoint_layers=auto", "launcher.slurm.gpu_mem_gib=20")))
    expected = memory.predict(compose(_slurm_8b(tmp_path, "train.checkpoint_layers=auto",
                                                "launcher.slurm.gpu_mem_gib=20")))
    assert (plan.speed.checkpoint_layers, plan.speed.offload_layers) == \
        (expected.checkpoint_layers, expected.offload_layers)
    assert plan.speed.offload_layers == 16 and 0 < plan.speed.checkpoint_layers < 16
    assert plan.memory["offloaded_layers"] == "16 of 32" and "keep their activations" in \
        plan.memory["checkpoint_layers_auto"]
    by_hand = build_plan(compose(_slurm_8b(tmp_path, "train.checkpoint_layers=4", "train.offload_layers=12")))
    assert (by_hand.speed.checkpoint_layers, by_hand.speed.offload_layers) == (4, 12)


def test_a_split_that_does_not_fit_is_refused_with_auto_as_a_fix(tmp_path: Path, output_root: Path) -> None:
    done = run_cli(*_slurm_8b(tmp_path, "train.checkpoint_layers=0", "train.offload_layers=8",
                              "launcher.slurm.gpu_mem_gib=24"), "dry_run=true", f"output_root={output_root}")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "[memory.fits]" in done.stderr
    assert "train.checkpoint_layers=auto train.offload_layers=null" in done.stderr
    assert not output_root.exists()


def test_the_callbacks_checkpoint_and_offload_the_layers_the_plan_says(tiny_model_dir: Path) -> None:
    """From the SpeedSpec to the hooks: 1 of 4 layers checkpointed (the middle of the stack), 1 of the other three
    offloaded whole (the middle one of them), 2 keep their activations."""
    from transformers import AutoModelForCausalLM

    from trainer.offload import decoder_layers
    from trainer.specs import SpeedSpec
    from trainer.speed import callbacks

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    speed = SpeedSpec(packing=True, flatten_packed_rows=False, fused_cross_entropy=True, fused_lora="off",
                      liger="off", gradient_checkpointing=True, checkpoint_layers=1, offload_activations=True,
                      tokens_per_step=64, offload_layers=1)
    for callback in callbacks(speed):
        callback.on_train_begin(None, None, None, model=model)
    layers = decoder_layers(model)
    assert [bool(layer.gradient_checkpointing) for layer in layers] == [False, False, True, False]
    assert [bool(getattr(layer, "_qforge_offloaded", False)) for layer in layers] == [False, True, True, False]


def test_offload_layers_without_checkpointing_is_accepted(tmp_path: Path) -> None:
    from trainer.validate import validate

    off = ["train.offload_activations=true", "train.gradient_checkpointing=false"]
    assert validate(compose([*off, "train.offload_layers=3"])).ok  # 3 of the tiny model's 4 layers
    too_many = [v for v in validate(compose([*off, "train.offload_layers=5"])).errors
                if v.rule_id == "train.offload_layers"]
    assert len(too_many) == 1 and "than the 4 layers of 4 that are not checkpointed (gradient checkpointing is off)" \
        in too_many[0].message


# ---- train.offload_activations=null: on by default where it applies ----

def _default_8b(tmp_path: Path, *extra: str) -> List[str]:
    """Work item a of bench/ (Llama-3-8B, 4 x 2048 tokens) planned for one GPU of a Slurm node with 64 GiB of host
    memory: the plan is for CUDA though this machine has none."""
    from tests.test_host_embeddings import _model_dir  # the 8B config beside the shipped tokenizer

    return ["model=local", f"model.name_or_path={_model_dir(tmp_path)}", "quant=bnb4", "train.max_seq_len=2048",
            "train.batch_size=4", "do_eval=false", "launcher=slurm", "launcher.slurm.gpus_per_node=1",
            "launcher.slurm.gpu_mem_gib=141", "train.host_mem_gib=64", *extra]


def test_the_default_offloads_half_the_layers_whole_and_checkpoints_the_rest(tmp_path: Path) -> None:
    from trainer.plan import build_plan

    plan = build_plan(compose(_default_8b(tmp_path)))
    assert plan.speed.offload_activations and plan.speed.checkpoint_layers == 16 and plan.speed.offload_layers is None
    assert "on by default" in plan.memory["activation_offload"]
    default = memory.predict(compose(_default_8b(tmp_path)))
    off = memory.predict(compose(_default_8b(tmp_path, "train.offload_activations=false")))
    assert default.offload_by_default and (default.checkpointed, default.offload_layers) == (16, 16)
    assert not off.offload_activations and off.checkpointed == 32
    assert default.host_bytes > off.host_bytes
    # An explicit true keeps its own meaning: every layer checkpointed, only the inputs on the host.
    explicit = memory.predict(compose(_default_8b(tmp_path, "train.offload_activations=true")))
    assert explicit.offload_activations and not explicit.offload_by_default and explicit.checkpointed == 32
    assert explicit.host_bytes < default.host_bytes


@pytest.mark.parametrize("extra, why", [
    (["train.host_mem_gib=16"], None),  # the pinned bytes would take more than half of it
    (["train.batch_size=1"], "under the work"),
    (["train.checkpoint_layers=8"], "train.checkpoint_layers is set"),
    (["launcher.slurm.gpus_per_node=2"], "more than one process"),
    (["train.gradient_checkpointing=false"], "gradient checkpointing is off"),
    (["do_train=false", "do_eval=true"], "does not train"),
    (["train.offload_activations=false"], None),
])
def test_the_default_leaves_offload_off_where_it_does_not_apply(tmp_path: Path, extra: List[str],
                                                                why: Union[str, None]) -> None:
    from trainer.plan import build_plan

    cfg = compose(_default_8b(tmp_path, *extra))
    p, x = memory.predict_with_inputs(cfg)
    assert p.known and not p.offload_activations and not p.offload_by_default
    assert not build_plan(cfg).speed.offload_activations
    if why is not None:
        undecided = dataclasses.replace(x, offload_auto=True)
        assert why in memory.offload_default_reason(undecided)


def test_a_gpu_too_small_for_the_default_is_told_to_checkpoint_every_layer_with_offload(tmp_path: Path) -> None:
    """Under the default split the memory rule's cheapest fix is an explicit offload with every layer
    checkpointed (the least GPU memory), not train.checkpoint_layers=null, which is what the run already says."""
    # Work item L (one 16k-token row): there the default split is predicted to need less than every layer
    # checkpointed, so it stays on where neither fits.
    cfg = compose(_default_8b(tmp_path, "train.max_seq_len=16384", "train.batch_size=1", "train.packing=false",
                              "train.host_mem_gib=256", "launcher.slurm.gpu_mem_gib=11"))
    p, x = memory.predict_with_inputs(cfg)
    assert p.offload_by_default
    found = memory.fixes(p, x)
    assert "train.offload_activations=true" in found and "train.checkpoint_layers=null" not in found


def _fake_host(tmp_path: Path, self_cgroup: str, files: Dict[str, str]) -> Tuple[Path, Path]:
    """A /proc with 64 GiB available and a cgroup mount with the given files (relative path -> content)."""
    proc, mount = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: {80 * 2**20} kB\nMemAvailable: {64 * 2**20} kB\n")
    (proc / "self" / "cgroup").write_text(self_cgroup)
    for name, content in files.items():
        (mount / name).parent.mkdir(parents=True, exist_ok=True)
        (mount / name).write_text(content)
    return proc, mount


@pytest.mark.parametrize("self_cgroup, files, expected", [
    # cgroup v2, a 16 GiB limit on the job's cgroup with 4 GiB used: 12 GiB left
    ("0::/job\n", {"job/memory.max": str(16 * 2**30), "job/memory.current": str(4 * 2**30),
                   "memory.max": "max", "memory.current": str(30 * 2**30)}, 12.0),
    # v2, the parent slice is the tighter limit
    ("0::/slice/job\n", {"slice/job/memory.max": "max", "slice/job/memory.current": "0",
                         "slice/memory.max": str(10 * 2**30), "slice/memory.current": str(2 * 2**30)}, 8.0),
    # v1 inside a container: the process's path is not below the mount, whose root is the container's cgroup
    ("4:memory:/docker/abc\n0::/\n", {"memory/memory.limit_in_bytes": str(20 * 2**30),
                                      "memory/memory.usage_in_bytes": str(5 * 2**30)}, 15.0),
    # v1 without a limit (the largest page-aligned int64): the machine's figure
    ("4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712",
                      "memory/memory.usage_in_bytes": str(2**30)}, 64.0),
    # a limit above what the machine has available: the machine's figure
    ("0::/\n", {"memory.max": str(100 * 2**30), "memory.current": str(2**30)}, 64.0),
])
def test_available_host_memory_is_the_tightest_of_the_machine_and_its_cgroups(
        tmp_path: Path, monkeypatch, self_cgroup: str, files: Dict[str, str], expected: float) -> None:
    """Pinned buffers count against a container's memory limit, which /proc/meminfo does not show."""
    from trainer.memory.host import available_gib

    monkeypatch.delenv("QFORGE_HOST_AVAILABLE_GIB", raising=False)
    proc, mount = _fake_host(tmp_path, self_cgroup, files)
    assert available_gib(str(proc), str(mount)) == pytest.approx(expected)
