"""Single-process training for real: the default run learns, every legal method trains and saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import only_run_dir, run_cli

METRIC_KEYS = {"train_loss", "eval_loss", "eval_loss_before", "steps", "tokens_per_second",
               "peak_memory_bytes", "wall_seconds"}


def test_default_run_learns_and_leaves_its_outputs(output_root: Path) -> None:
    result = run_cli(f"output_root={output_root}")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(output_root)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    # Clearly below: the held-out loss falls by more than 5% of where it started.
    assert metrics["eval_loss"] < 0.95 * metrics["eval_loss_before"], metrics
    assert metrics["steps"] > 0 and metrics["tokens_per_second"] > 0
    assert (run_dir / "loss.png").stat().st_size > 10_000
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert (run_dir / "checkpoints").is_dir()
    assert "%|" in result.stderr  # the progress bar showed
    # Nothing qforge calls warns of a deprecation (transformers >= 5.23 renamed past_key_values and
    # gradient_checkpointing), and no library noise a user cannot act on.
    for noise in ("FutureWarning", "DeprecationWarning", "gemm_4bit_forward", "unable to detect"):
        assert noise not in result.stderr, noise
    # What it ran on, for reproducing it: in the plan before the run, in metrics.json after it.
    import importlib.metadata

    plan = json.loads((run_dir / ".hydra" / "plan.json").read_text())
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        assert plan["versions"][name] == metrics["versions"][name] == importlib.metadata.version(name)
    assert metrics["versions"]["torch_cpu_capability"] and metrics["versions"]["cpu"]

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.compose import compose
    from trainer.tiny import ensure_tiny_model

    base = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(compose([]).model.tiny))
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    trained = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert trained, "the saved adapter holds no LoRA weights"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 12]])).logits).all()


@pytest.mark.parametrize("overrides, saved", [
    (["quant=none", "peft=lora"], "adapter"),
    (["quant=bnb8", "peft=lora"], "adapter"),
    (["quant=bnb4", "peft=dora"], "adapter"),
    (["quant=none", "peft=full"], "model"),
    (["quant=none", "peft=freeze"], "model"),
])
def test_methods_train_and_save(overrides: list[str], saved: str, output_root: Path) -> None:
    result = run_cli(*overrides, "train.max_steps=12", "train.eval_steps=12", "train.save_steps=12",
                     "train.lr=1e-3", f"output_root={output_root}")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(output_root)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 12
    assert metrics["eval_loss"] < metrics["eval_loss_before"], metrics
    assert (run_dir / saved / "config.json").exists() or (run_dir / saved / "adapter_config.json").exists()


def test_finished_run_is_never_overwritten(output_root: Path) -> None:
    run_dir = output_root / "mine"
    first = run_cli("quant=none", "train.max_steps=2", "do_eval=false", "data.eval_fraction=0",
                    f"run_dir={run_dir}", f"output_root={output_root}")
    assert first.returncode == 0, first.stderr[-2000:]
    before = (run_dir / "metrics.json").read_bytes()
    again = run_cli("quant=none", "train.max_steps=2", "do_eval=false", "data.eval_fraction=0",
                    f"run_dir={run_dir}", f"output_root={output_root}")
    assert again.returncode != 0
    assert "already holds a finished run" in again.stderr and "Traceback" not in again.stderr
    assert (run_dir / "metrics.json").read_bytes() == before


def test_eval_samples_are_written_before_and_after_training_with_the_chat_template(output_root: Path) -> None:
    import math

    result = run_cli("eval.samples=2", "eval.max_new_tokens=8", "train.max_steps=4", "train.eval_steps=4",
                     f"output_root={output_root}")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(output_root)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert metrics["eval_perplexity_before"] == pytest.approx(math.exp(metrics["eval_loss_before"]))
    samples = (run_dir / "samples.md").read_text()
    assert samples.count("## Sample ") == 2 and metrics["samples"] == str(run_dir / "samples.md")
    # Asked the way the shipped ChatML template renders a conversation, ending with the assistant header.
    assert samples.count("<|im_start|>assistant") == 2 and samples.count("**Reference:**") == 2
    assert samples.count("**Before training:**") == 2 and samples.count("**After training:**") == 2
    for overrides, rule in ((["strategy=fsdp", "launcher=torchrun"], "eval.samples_sharded"),
                            (["do_eval=false", "data.eval_fraction=0"], "eval.samples_needs_eval")):
        refused = run_cli("eval.samples=2", *overrides, "dry_run=true")
        assert refused.returncode == 2 and f"[{rule}]" in refused.stderr, refused.stderr
