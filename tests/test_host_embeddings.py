"""train.embeddings_on_host (trainer/host_embeddings.py): the frozen embedding table in pinned host memory.

Plan time on CPU: where null turns it on (one CUDA process, frozen untied table), where true is refused with the
reason, and that the plan carries the decision to the ranks. The CUDA path (the table read in place from pinned
memory, the same losses, the GPU memory it frees) is the gpu-marked test at the end, run on the GPU machine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List

import pytest
import torch

from tests.conftest import only_run_dir, run_cli
from trainer.compose import compose
from trainer.errors import UserError
from trainer.schema import TinyArch
from trainer.tiny import ensure_tiny_model

LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "tie_word_embeddings": False}


def _model_dir(root: Path, tied: bool = False) -> Path:
    """An 8B-shaped local model directory (config and the shipped tokenizer; no weights: plans only)."""
    from trainer.assets import __file__ as assets_init

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({**LLAMA3_8B, "tie_word_embeddings": tied}))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(assets_init).parent / "tokenizer" / name, root / name)
    return root


def _slurm(model_dir: Path, *extra: str) -> List[str]:
    """Planned for one GPU of a Slurm node: the plan is for CUDA though this machine has none."""
    return ["model=local", f"model.name_or_path={model_dir}", "quant=bnb4", "do_eval=false", "launcher=slurm",
            "launcher.slurm.gpus_per_node=1", *extra]


def test_the_plan_puts_the_table_in_host_memory_for_one_cuda_process_only(tmp_path: Path) -> None:
    from trainer.plan import build_plan

    model_dir = _model_dir(tmp_path / "8b")
    plan = build_plan(compose(_slurm(model_dir)))
    assert plan.speed.embeddings_on_host
    assert "embeddings" not in plan.memory["breakdown_gib"]
    assert "lm_head" not in plan.memory["breakdown_gib"]  # copied in for the loss, not held
    assert plan.memory["pinned_host_per_gpu_gib"] == pytest.approx(2 * 128256 * 4096 * 2 / 2**30, abs=1e-3)
    assert not build_plan(compose(_slurm(model_dir, "train.embeddings_on_host=false"))).speed.embeddings_on_host
    two = ["launcher.slurm.gpus_per_node=2", "strategy=ddp"]
    assert not build_plan(compose(_slurm(model_dir, *two))).speed.embeddings_on_host
    tied = _model_dir(tmp_path / "tied", tied=True)
    assert not build_plan(compose(_slurm(tied))).speed.embeddings_on_host
    # this machine trains on CPU: null leaves the table where it is
    assert not build_plan(compose(["quant=bnb4"])).speed.embeddings_on_host


@pytest.mark.parametrize("overrides, reason", [
    (["launcher.slurm.gpus_per_node=2", "strategy=ddp"], "broadcasts or shards every parameter"),
    (["peft=full", "quant=none"], "peft.method=full trains the embedding table"),
    (["model.resize_vocab=true"], "trains the embedding table whole"),
    (["TIED"], "ties lm_head to the embedding table"),
])
def test_asking_for_it_where_it_cannot_apply_is_refused_with_the_reason(tmp_path: Path, output_root: Path,
                                                                        overrides: List[str], reason: str) -> None:
    model_dir = _model_dir(tmp_path / "m", tied=overrides == ["TIED"])
    extra = [o for o in overrides if o != "TIED"]
    done = run_cli(*_slurm(model_dir, *extra), "train.embeddings_on_host=true", "dry_run=true",
                   f"output_root={output_root}")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "[train.embeddings_on_host]" in done.stderr and reason in done.stderr
    assert "train.embeddings_on_host=null" in done.stderr  # the fix
    assert not output_root.exists()


def test_asking_for_it_on_a_cpu_run_is_refused(output_root: Path) -> None:
    done = run_cli("train.embeddings_on_host=true", "dry_run=true", f"output_root={output_root}")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "train.embeddings_on_host=true" in done.stderr and "trains on CPU" in done.stderr
    assert not output_root.exists()


def test_the_host_memory_rule_counts_the_table(tmp_path: Path) -> None:
    """The table is pinned host memory like offloaded activations: a node too small for it is refused, with
    train.embeddings_on_host=false as the fix."""
    from trainer.validate import validate

    cfg = compose(_slurm(_model_dir(tmp_path / "8b"), "train.host_mem_gib=1"))
    [violation] = [v for v in validate(cfg).errors if v.rule_id == "memory.host_offload"]
    assert violation.message.startswith("train.embeddings_on_host keep(s) 2.0 GiB per GPU in pinned host memory")
    assert "set train.embeddings_on_host=false (its 2.0 GiB go back to the GPU)" in violation.fix
    assert "offload_activations" not in violation.fix
    assert not [v for v in validate(compose(_slurm(_model_dir(tmp_path / "8b"), "train.host_mem_gib=1",
                                                   "train.embeddings_on_host=false"))).errors
                if v.rule_id == "memory.host_offload"]


def _tiny(tied: bool, layers: int = 1) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


def test_the_rank_refuses_a_tied_table_and_a_table_off_the_gpu() -> None:
    """The plan's decision is checked where it is carried out: a head sharing the table (a shape the plan could
    not read) and a table that is not on a CUDA GPU are refused with a sentence, and nothing is moved."""
    from trainer.host_embeddings import move

    tied = _tiny(tied=True)
    with pytest.raises(UserError, match="lm_head shares the embedding table"):
        move(tied)
    assert tied.get_input_embeddings().weight is tied.get_output_embeddings().weight
    untied = _tiny(tied=False)
    with pytest.raises(UserError, match="not a CUDA GPU"):
        move(untied)
    assert untied.get_input_embeddings().weight.device.type == "cpu"


@pytest.mark.gpu
def test_on_gpu_the_table_is_read_in_place_from_host_memory_with_the_same_losses(output_root: Path) -> None:
    """On CUDA: the embedding weight aliases pinned host memory (its pointer is the host buffer's) and looks up the
    same rows; under the chunked loss lm_head's weight moves too and the head computes the same logits and loss;
    a run trains the same losses as with both on the GPU, and its peak is lower by at least the table's bytes."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from trainer import fused_loss
    from trainer.host_embeddings import move

    model = _tiny(tied=False).to("cuda", torch.bfloat16).requires_grad_(False)  # frozen, as the run has it
    rows = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings().weight.detach().clone()
    ids = torch.randint(0, 64, (3, 7), device="cuda")
    with torch.no_grad():
        loss_before = model(input_ids=ids, labels=ids).loss
    assert fused_loss.install(model)
    with torch.no_grad():
        chunked_before = model(input_ids=ids, labels=ids).loss
    before = torch.cuda.memory_allocated()
    freed = move(model)
    assert freed == rows.numel() * 2 + head.numel() * 2  # the table and the head (the chunked loss reads it)
    weight = model.get_input_embeddings().weight
    assert weight.device.type == "cuda" and not weight.requires_grad
    assert torch.cuda.memory_allocated() == before - freed  # the GPU copies are gone
    assert weight.data_ptr() == model.get_input_embeddings()._qforge_host_table.data_ptr()
    assert torch.equal(model.get_input_embeddings()(ids), torch.nn.functional.embedding(ids, rows))
    hidden = torch.randn(5, 16, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(model.get_output_embeddings()(hidden), torch.nn.functional.linear(hidden, head))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, labels=ids).loss, chunked_before)
        assert model(input_ids=ids, labels=ids).loss.item() == pytest.approx(loss_before.item(), rel=1e-2)

    common = ["train.max_steps=6", "train.logging_steps=1", "do_eval=false", "train.max_seq_len=512",
              "train.batch_size=8", "train.lr=1e-3", "train.warmup_ratio=0", "peft.dropout=0"]
    results = {}
    for on in ("false", "null"):
        out = output_root / on
        done = run_cli(*common, f"train.embeddings_on_host={on}", f"output_root={out}",
                       env={"CUDA_VISIBLE_DEVICES": "0"})
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("table" in done.stderr and "in pinned host memory" in done.stderr) == (on == "null")
        results[on] = json.loads((only_run_dir(out) / "metrics.json").read_text())
        plan = json.loads((only_run_dir(out) / ".hydra" / "plan.json").read_text())
        assert plan["speed"]["embeddings_on_host"] == (on == "null")
    losses = {k: [e["loss"] for e in m["log_history"] if "loss" in e] for k, m in results.items()}
    assert losses["null"] == pytest.approx(losses["false"], rel=1e-3)
    saved = results["false"]["peak_memory_bytes"] - results["null"]["peak_memory_bytes"]
    config = json.loads((ensure_tiny_model(TinyArch()) / "config.json").read_text())
    table = config["vocab_size"] * config["hidden_size"] * 2  # bf16; lm_head is the same size
    # the table is never on the GPU; the head's copy is there only while the loss runs, which may be the peak
    assert 0.9 * table <= saved <= 2.1 * table


@pytest.mark.gpu
def test_on_gpu_the_head_is_copied_in_a_few_layers_before_the_loss_once_per_labelled_forward() -> None:
    """lm_head's copy in starts on a side stream at the decoder layer HEAD_LEAD_LAYERS from the end, once per
    labelled forward: not in checkpointing's recompute in backward, not in an unlabelled forward (the head copies
    in itself there). Loss and grads are those of the head kept on the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from trainer import fused_loss
    from trainer.host_embeddings import HEAD_LEAD_LAYERS, move

    torch.manual_seed(0)
    model = _tiny(tied=False, layers=6).to("cuda", torch.bfloat16).requires_grad_(False)
    norm = model.model.layers[0].input_layernorm.weight.requires_grad_(True)  # backward runs through every layer
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert fused_loss.install(model)
    ids = torch.randint(0, 64, (3, 7), device="cuda")

    def loss_and_grad() -> tuple:
        norm.grad = None
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), norm.grad.clone()

    on_gpu = loss_and_grad()
    move(model)
    prefetch = getattr(model.get_output_embeddings(), fused_loss.PREFETCH)
    layers, lead = model.model.layers, len(model.model.layers) - HEAD_LEAD_LAYERS
    seen: dict = {}

    def record_copies_after(index: int):
        def hook(module, args, output) -> None:  # returns None: a forward hook's return value replaces the output
            seen.setdefault(index, prefetch.copies)

        return hook

    for i in (lead - 1, lead):  # the copies started when each layer's first forward (not its recompute) ends
        layers[i].register_forward_hook(record_copies_after(i))
    from_host = loss_and_grad()
    assert seen == {lead - 1: 0, lead: 1}
    assert prefetch.copies == 1  # the recompute in backward ran the lead layer's hooks again, unarmed
    assert torch.equal(from_host[0], on_gpu[0])
    torch.testing.assert_close(from_host[1], on_gpu[1])  # bf16; SDPA's backward sums in no fixed order
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert prefetch.copies == 1 and logits.shape == (3, 7, 64)
    assert loss_and_grad()[0] == from_host[0] and prefetch.copies == 2


def test_the_wide_lookup_reads_the_same_rows_as_the_stock_one() -> None:
    """The moved table is read as 8-byte words (fewer requests over the host link): the same bytes come out."""
    from trainer.host_embeddings import _wide_lookup

    table = torch.nn.Embedding(50, 24, padding_idx=0).to(torch.bfloat16).requires_grad_(False)
    ids = torch.randint(0, 50, (3, 11))
    stock = table(ids)
    assert torch.equal(_wide_lookup(table)(ids), stock)
    assert torch.equal(_wide_lookup(table)(ids[0]), stock[0])  # any shape of ids
