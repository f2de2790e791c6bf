"""A checkpoint saved already quantized by bitsandbytes (like the hub's "-bnb-4bit" models) with quant=bnb4.

transformers loads such a checkpoint with its own quantization settings and ignores the ones it is given (with a
warning), so quant=bnb8 on a 4-bit checkpoint used to train 4-bit. The validator now compares the composition
with the checkpoint before anything runs, and the loader takes the checkpoint as saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import only_run_dir, run_cli
from trainer.schema import TinyArch
from trainer.tiny import ensure_tiny_model


@pytest.fixture(scope="module")
def prequantized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model quantized to NF4 (double quant, uint8 storage: transformers' defaults) and saved so."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    source = ensure_tiny_model(TinyArch())
    target = tmp_path_factory.mktemp("bnb4-saved") / "model"
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config, dtype=torch.float32)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    assert json.loads((target / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    return target


@pytest.mark.parametrize("overrides, says", [
    (["quant=bnb8"], "a pre-quantized bitsandbytes 4-bit checkpoint, not 8-bit"),
    (["quant=bnb4", "quant.quant_type=fp4"], "saved with quant.quant_type=nf4"),
    (["quant=bnb4", "quant.double_quant=false"], "saved with quant.double_quant=true"),
    (["quant=bnb4", "strategy=fsdp", "launcher=torchrun", "launcher.nproc_per_node=2"], "stored as uint8"),
])
def test_a_composition_the_saved_checkpoint_does_not_match_is_refused(prequantized: Path, output_root: Path,
                                                                     overrides: list, says: str) -> None:
    result = run_cli("model=local", f"model.name_or_path={prequantized}", *overrides, "dry_run=true",
                     f"output_root={output_root}")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "[bnb.prequantized_checkpoint]" in errors[0] and says in errors[0], errors
    assert "Traceback" not in result.stderr and not output_root.exists()


def test_the_saved_checkpoint_trains_as_saved(prequantized: Path, output_root: Path) -> None:
    result = run_cli("model=local", f"model.name_or_path={prequantized}", "quant=bnb4", "train.max_steps=3",
                     "do_eval=false", f"output_root={output_root}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already has a `quantization_config`" not in result.stderr  # ours was not passed to be ignored
    run_dir = only_run_dir(output_root)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["train_loss"] > 0
    # the plan decided it: loaded as saved, at the run's compute dtype
    plan = json.loads((run_dir / ".hydra" / "plan.json").read_text())
    assert plan["quant"]["load_kwargs"] == {"saved_quantized": True, "bnb_4bit_compute_dtype": plan["compute_dtype"]}
