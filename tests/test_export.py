"""Exports that serve: a bnb4-trained run merged into a bf16 model any loader reads (same logits as the adapter
model), a clean adapter with a model card, and bad input refused in one sentence without touching anything."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

from tests.conftest import REPO, only_run_dir, run_cli


def export_cli(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.export", *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env=dict(os.environ))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short bnb4 QLoRA run whose adapter moved far enough from zero to show in the logits."""
    root = tmp_path_factory.mktemp("export-run")
    result = run_cli("quant=bnb4", "train.max_steps=8", "train.lr=5e-3", "train.warmup_ratio=0",
                     "train.eval_steps=8", "train.save_steps=8", f"output_root={root}")
    assert result.returncode == 0, result.stderr[-3000:]
    return only_run_dir(root)


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _ids():
    import torch

    return torch.tensor([[1, 17, 42, 99, 7, 256, 3, 88, 5, 64]])


def test_merged_bf16_export_loads_anywhere_and_computes_what_the_adapter_model_computes(trained_run: Path,
                                                                                       tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    result = export_cli(f"run_dir={trained_run}", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"exported to {out}" in result.stdout
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "qforge_export.json"} <= files
    assert any(name.endswith(".safetensors") for name in files) and not any(name.startswith(".") for name in files)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype" if "dtype" in config else "torch_dtype"] == "bfloat16"
    manifest = json.loads((out / "qforge_export.json").read_text())
    plan = json.loads((trained_run / ".hydra" / "plan.json").read_text())
    # The base came from the original 16-bit checkpoint the run quantized while loading, not a 4-bit copy.
    assert manifest["base"] == plan["model"]["source"] and manifest["dequantized"] is False

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    base = AutoModelForCausalLM.from_pretrained(plan["model"]["source"], dtype=torch.bfloat16)
    adapter_model = PeftModel.from_pretrained(base, trained_run / "adapter").eval()
    ids = _ids()
    exported, reference = _logits(merged, ids), _logits(adapter_model, ids)
    with adapter_model.disable_adapter():
        plain = _logits(adapter_model, ids)
    # bf16 tolerance: the merge rounds W + BA to bf16 once; the adapter model rounds each product.
    assert torch.allclose(exported, reference, atol=0.08, rtol=0.02), (exported - reference).abs().max()
    assert (exported - plain).abs().max() > 10 * (exported - reference).abs().max()  # the adapter is in it


def test_merged_float16_and_the_dequantized_bnb_weights(trained_run: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    half = export_cli(f"run_dir={trained_run}", "export.dtype=float16", f"output_dir={tmp_path / 'fp16'}")
    assert half.returncode == 0, half.stderr[-3000:]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "fp16").dtype == torch.float16
    deq = export_cli(f"run_dir={trained_run}", "export.dequantize=true", f"output_dir={tmp_path / 'deq'}")
    assert deq.returncode == 0, deq.stderr[-3000:]
    manifest = json.loads((tmp_path / "deq" / "qforge_export.json").read_text())
    assert manifest["dequantized"] is True
    # Merged into the 4-bit weights the adapter trained against: close to, not equal to, the 16-bit merge.
    a = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "deq"), _ids())
    b = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "fp16", dtype=torch.bfloat16), _ids())
    assert 0 < (a - b).abs().max() < 2.0


def test_adapter_export_is_clean_and_carries_a_model_card(trained_run: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter-export"
    result = export_cli("export.method=adapter", f"run_dir={trained_run}", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json",
                                                      "adapter_model.safetensors", "qforge_export.json"]
    card = (out / "README.md").read_text()
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert card.startswith("---\nlibrary_name: peft\n")
    for fact in ("bnb 4-bit", "lora", "sample_instructions.jsonl", "| eval_loss |", f"{metrics['eval_loss']:.4g}",
                 "| eval_perplexity |", "PeftModel.from_pretrained"):
        assert fact in card, fact
    plan = json.loads((trained_run / ".hydra" / "plan.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(plan["model"]["source"], dtype=torch.float32)
    exported = PeftModel.from_pretrained(base, out).eval()
    original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(plan["model"]["source"],
                                                                              dtype=torch.float32),
                                         trained_run / "adapter").eval()
    assert torch.equal(_logits(exported, _ids()), _logits(original, _ids()))


def _hashes(root: Path) -> Dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_bad_export_input_is_one_sentence_and_touches_nothing(trained_run: Path, tmp_path: Path) -> None:
    from trainer.compose import compose
    from trainer.tiny import ensure_tiny_model

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("an earlier export")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained_run / ".hydra", unfinished / ".hydra")
    other_shape = ensure_tiny_model(compose(["model.tiny.hidden_size=64", "model.tiny.intermediate_size=128"])
                                    .model.tiny)
    before = _hashes(trained_run)
    cases = [
        ([f"run_dir={trained_run}", f"output_dir={taken}"], "already exists; an export never overwrites one"),
        ([f"run_dir={unfinished}", f"output_dir={tmp_path / 'x1'}"], "has no adapter yet"),
        ([f"run_dir={tmp_path / 'nothing-here'}", f"output_dir={tmp_path / 'x2'}"], "holds no qforge run"),
        (["model=local", "model.name_or_path=/no/such/base", f"model.adapters=[{trained_run / 'adapter'}]",
          f"output_dir={tmp_path / 'x3'}"], "is not a model dir on this machine"),
        (["model=local", f"model.name_or_path={other_shape}", f"model.adapters=[{trained_run / 'adapter'}]",
          f"output_dir={tmp_path / 'x4'}"], "does not fit the base model"),
        ([f"output_dir={tmp_path / 'x5'}"], "[export.needs_an_adapter]"),
        ([f"run_dir={trained_run}", "export.method=bogus"], "export.method=bogus is not one of"),
    ]
    for overrides, says in cases:
        result = export_cli(*overrides)
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode != 0 and len(lines) == 1 and says in lines[0], (overrides, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (taken / "keep.txt").read_text() == "an earlier export" and sorted(p.name for p in taken.iterdir()) == [
        "keep.txt"]
    assert not any((tmp_path / f"x{i}").exists() for i in range(1, 6))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch dir left behind
    assert _hashes(trained_run) == before
