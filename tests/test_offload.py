"""train.offload_activations (trainer/offload.py): checkpointed layer inputs in host memory.

On CPU the hooks run in simulate mode (a separate CPU copy stands in for pinned host memory, no streams): what
is packed is exactly each checkpointed layer's input, everything comes back in reverse order, and the gradients
are the ones without offloading, bit for bit. The CUDA path (side stream, prefetch, the memory it saves) is the
gpu-marked test at the end, run on the GPU machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest
import torch

from tests.conftest import only_run_dir, run_cli
from trainer import memory
from trainer.compose import compose
from trainer.offload import LayerInputOffloader, offload_checkpointed_layers
from trainer.schema import TinyArch
from trainer.tiny import ensure_tiny_model


@pytest.fixture(scope="module")
def tiny_model_dir() -> Path:
    return ensure_tiny_model(TinyArch())


def _grads(model_dir: Path, offloader: Any = None, keep: int = 99) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < keep  # as trainer/speed.py's partial checkpointing does
    if offloader is not None:
        assert offload_checkpointed_layers(model, offloader) == min(keep, len(layers))
    ids = torch.randint(5, 800, (2, 24), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("keep", [99, 1], ids=["every-layer", "first-layer-only"])
def test_offloaded_inputs_come_back_and_give_the_same_gradients(tiny_model_dir: Path, keep: int) -> None:
    loss, grads = _grads(tiny_model_dir, keep=keep)
    offloader = LayerInputOffloader(min_bytes=0, simulate=True)
    offloaded_loss, offloaded_grads = _grads(tiny_model_dir, offloader, keep=keep)
    assert torch.equal(offloaded_loss, loss)
    assert set(offloaded_grads) == set(grads)
    for name, grad in grads.items():
        assert torch.equal(offloaded_grads[name], grad), name
    arch = TinyArch()
    # one saved tensor per checkpointed layer, its hidden states (batch x seq x hidden), all unpacked by backward
    assert len(offloader.saved) == min(keep, arch.num_hidden_layers)
    assert all(tuple(s.host.shape) == (2, 24, arch.hidden_size) for s in offloader.saved)
    assert all(s.unpacked for s in offloader.saved)


def test_small_tensors_stay_where_they_are() -> None:
    offloader = LayerInputOffloader(min_bytes=1 << 20, simulate=True)
    small = torch.ones(8)
    assert offloader.pack(small) is small and offloader.unpack(small) is small and not offloader.saved


def test_offload_is_refused_where_it_does_nothing(output_root: Path) -> None:
    no_layer = run_cli("train.offload_activations=true", "train.checkpoint_layers=0", "dry_run=true",
                       f"output_root={output_root}")
    assert no_layer.returncode == 2 and "train.offload_needs_checkpointing" in no_layer.stderr
    on_cpu = run_cli("train.offload_activations=true", f"output_root={output_root}")
    assert on_cpu.returncode == 1 and "Traceback" not in on_cpu.stderr  # a UserError at plan time
    assert "this run trains on CPU" in on_cpu.stderr and not output_root.exists()


def test_the_memory_model_keeps_two_offloaded_inputs_on_the_gpu(tmp_path: Path) -> None:
    config = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
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


@pytest.mark.gpu
def test_offload_on_gpu_trains_the_same_in_less_memory(output_root: Path) -> None:
    """On CUDA: the same losses as without offloading, and a lower peak (the side stream and prefetch path)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    common = ["train.max_steps=6", "train.logging_steps=1", "do_eval=false", "train.max_seq_len=512",
              "train.batch_size=8", "train.lr=1e-3", "train.warmup_ratio=0", "peft.dropout=0"]
    results = {}
    for offload in ("false", "true"):
        out = output_root / offload
        done = run_cli(*common, f"train.offload_activations={offload}", f"output_root={out}",
                       env={"CUDA_VISIBLE_DEVICES": "0"})
        assert done.returncode == 0, done.stderr[-3000:]
        results[offload] = json.loads((only_run_dir(out) / "metrics.json").read_text())
    losses = {k: [e["loss"] for e in m["log_history"] if "loss" in e] for k, m in results.items()}
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-3)
    assert results["true"]["peak_memory_bytes"] < results["false"]["peak_memory_bytes"]
