"""GPTQ export: its rules refuse what LLaMA-Factory refuses, and the round trip works for real:
merge an adapter into the tiny model, GPTQ-quantize it on CPU, then QLoRA-train on the export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from tests.conftest import REPO, cpu_paths, run_cli
from tests.test_quant_backends import SMALL, trained_adapter


def export_cli(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.export", *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env=dict(os.environ))


GPTQ = ["export.method=gptq", "model.adapters=[/some/adapter]"]


@pytest.mark.parametrize("overrides, rule_ids", [
    ([*GPTQ], {"export.calibration_dataset"}),
    ([*GPTQ, "export.dataset=x.jsonl", "export.compute_dtype=bfloat16", "export.bits=5"],
     {"export.fp16_compute", "export.gptq_bits"}),
    ([*GPTQ, "export.dataset=x.jsonl", "model.family=chatglm", "export.nsamples=0"],
     {"export.no_chatglm", "export.positive_sizes"}),
    ([*GPTQ, "export.dataset=x.jsonl"], set()),
    (["model.adapters=[/some/adapter]", "export.bits=5"], set()),  # merged: GPTQ's knobs are not its rules
    ([], {"export.needs_an_adapter"}),
    (["run_dir=/runs/x", "model.adapters=[/a]"], {"export.one_source"}),
    (["export.method=adapter", "model.adapters=[/a,/b]"], {"export.adapter_is_one"}),
])
def test_export_rules(overrides: List[str], rule_ids: set) -> None:
    from trainer.export import compose_export
    from trainer.export_rules import RULES
    from trainer.validate import validate

    assert {v.rule_id for v in validate(compose_export(overrides), rules=RULES).errors} == rule_ids


def test_export_without_calibration_data_is_refused_in_one_sentence() -> None:
    result = export_cli(*GPTQ)
    assert result.returncode != 0
    assert "[export.calibration_dataset] GPTQ export needs a calibration dataset" in result.stderr
    assert "Traceback" not in result.stderr


def test_export_refuses_an_unmerged_adapter_given_as_the_model(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    result = export_cli("model=local", f"model.name_or_path={adapter}", f"model.adapters=[{adapter}]",
                        "export.dataset=${asset:sample_instructions.jsonl}")
    assert result.returncode != 0
    assert "is an unmerged adapter, not a model" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_gptq_round_trip_merges_the_adapter_and_trains_on_the_export(tmp_path: Path, output_root: Path) -> None:
    pytest.importorskip("gptqmodel", reason="pip install 'qforge[gptq]'")
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.schema import TinyArch
    from trainer.tiny import ensure_tiny_model

    base_dir = ensure_tiny_model(TinyArch(num_hidden_layers=2))
    # An adapter far from zero, so a dropped merge would show in the exported model's outputs.
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=64, target_modules="all-linear",
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")

    out = tmp_path / "gptq4"
    result = export_cli("export.method=gptq", "model.tiny.num_hidden_layers=2",
                        f"model.adapters=[{tmp_path / 'adapter'}]",
                        "export.dataset=${asset:sample_instructions.jsonl}", "export.nsamples=16",
                        "export.max_len=64", "export.group_size=32", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "gptq" and quant["bits"] == 4
    manifest = json.loads((out / "qforge_export.json").read_text())
    assert manifest["adapters_merged"] == [str(tmp_path / "adapter")] and manifest["calibration"]["nsamples"] == 16

    # The export computes what base+adapter computes, not what the base alone does.
    ids = torch.tensor([[1, 17, 42, 99, 7, 256, 3, 88]])
    with torch.no_grad():
        merged = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), tmp_path / "adapter"
        ).merge_and_unload()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)(ids).logits
        exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    assert (exported - merged).norm() < 0.5 * (exported - plain).norm()

    for path, cpu_env in enumerate(p.values[0] for p in cpu_paths() if not p.marks):
        root = output_root / str(path)
        result = run_cli("quant=gptq", "model=local", f"model.name_or_path={out}", *SMALL, f"output_root={root}",
                         env=cpu_env)
        trained_adapter(root, result)
        # gptqmodel's ATen int4pack kernel, which has a backward pass, named explicitly (trainer/quant/gptq.py).
        assert "quantized layers: TorchAtenLinear" in result.stderr
