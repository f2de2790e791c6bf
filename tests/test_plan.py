"""The RunPlan as the contract: what the dry run prints is what plan.json holds and what a rank reads back,
typed; a rank refuses a plan it did not write; every key does something or is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_cli
from trainer.compose import compose
from trainer.plan import RunPlan, build_plan
from trainer.validate import validate


def test_the_plan_round_trips_through_plan_json_typed(tmp_path: Path) -> None:
    plan = build_plan(compose(["quant=bnb4", "strategy=fsdp", "launcher=torchrun", "launcher.nproc_per_node=2"]),
                      run_dir=str(tmp_path / "run"))
    plan.write()
    back = RunPlan.read(str(tmp_path / "run"))
    assert back == plan and back.to_dict() == plan.to_dict()
    assert back.strategy.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert back.quant.load_kwargs["bnb_4bit_quant_storage"] == back.compute_dtype  # FSDP shards bnb4
    assert back.model.device_map is None and back.speed.fused_cross_entropy is True  # CPU; FSDP's head gathered


def test_the_dry_run_prints_exactly_the_plan_a_rank_reads(output_root: Path) -> None:
    shown = run_cli("quant=hqq", "quant.bits=3", "strategy=ddp", "launcher=torchrun", "dry_run=true",
                    f"run_dir={output_root / 'run'}")
    assert shown.returncode == 0, shown.stderr
    printed = yaml.safe_load(shown.stdout)
    expected = build_plan(compose(["quant=hqq", "quant.bits=3", "strategy=ddp", "launcher=torchrun"]),
                          run_dir=str(output_root / "run"))
    expected.warnings = printed["warnings"]
    assert printed == json.loads(json.dumps(expected.to_dict(), default=str))
    assert printed["quant"]["load_kwargs"] == {"bits": 3, "group_size": 64}
    assert not output_root.exists()


def test_a_rank_refuses_a_plan_of_another_qforge(tmp_path: Path) -> None:
    plan = build_plan(compose([]), run_dir=str(tmp_path / "run"))
    plan.qforge_version = "0.0.0-other"
    plan.write()
    result = subprocess.run([sys.executable, "-m", "trainer.rank", str(tmp_path / "run")], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": "1"})
    assert result.returncode == 1 and "was planned by qforge 0.0.0-other" in result.stderr
    assert "Traceback" not in result.stderr
    missing = subprocess.run([sys.executable, "-m", "trainer.rank", str(tmp_path / "nothing")], cwd=REPO,
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "holds no plan.json" in missing.stderr


def test_a_rank_refuses_a_process_layout_the_plan_did_not_plan(tmp_path: Path) -> None:
    plan = build_plan(compose(["strategy=ddp", "launcher=torchrun", "launcher.nproc_per_node=2"]),
                      run_dir=str(tmp_path / "run"))
    plan.write()
    result = subprocess.run([sys.executable, "-m", "trainer.rank", str(tmp_path / "run")], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": "3"})
    assert result.returncode == 1 and "planned for 2 process(es), but this rank is one of 3" in result.stderr


@pytest.mark.parametrize("overrides, rule", [
    (["quant=bnb4", "quant.group_size=32"], "bnb.knobs"),
    (["quant=hqq", "quant.quant_type=fp4"], "hqq.knobs"),
    (["quant=bnb8", "quant.double_quant=false"], "bnb.8bit_knobs"),
    (["quant=none", "quant.bits=4"], "none.bits"),
    (["quant=gptq", "quant.group_size=128", "model=local", "model.name_or_path=/m"], "gptq.knobs"),
])
def test_a_knob_the_backend_does_not_read_is_refused(overrides: list, rule: str) -> None:
    errors = validate(compose(overrides)).errors
    assert rule in {v.rule_id for v in errors}, [v.line() for v in errors]
    assert validate(compose(["quant=hqq", "quant.group_size=32"])).ok  # HQQ reads it


def test_an_unknown_family_is_refused_with_the_known_ones() -> None:
    refused = run_cli("model.family=gpt5", "dry_run=true")
    assert refused.returncode == 2 and "model.family=gpt5 is not one of" in refused.stderr
    assert "llama" in refused.stderr and "qwen2" in refused.stderr and "Traceback" not in refused.stderr


def test_family_auto_reads_a_local_checkpoint(tmp_path: Path) -> None:
    model = tmp_path / "qwen"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    plan = build_plan(compose(["model=local", f"model.name_or_path={model}", "strategy=fsdp",
                               "launcher=torchrun"]))
    assert plan.model.family == "qwen2" and plan.strategy.fsdp_config["transformer_layer_cls_to_wrap"] == [
        "Qwen2DecoderLayer"]
    (model / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    from trainer.errors import UserError

    with pytest.raises(UserError, match="is a mamba model, which qforge has no decoder-layer facts for"):
        build_plan(compose(["model=local", f"model.name_or_path={model}"]))


def test_hydra_run_dir_picks_the_run_dir(tmp_path: Path) -> None:
    shown = run_cli(f"hydra.run.dir={tmp_path / 'mine'}", "dry_run=true")
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["run_dir"] == str(tmp_path / "mine")
    assert not (tmp_path / "mine").exists()  # a dry run still creates nothing
    both = run_cli(f"hydra.run.dir={tmp_path / 'a'}", f"run_dir={tmp_path / 'b'}", "dry_run=true")
    assert both.returncode != 0 and "keep one of them" in both.stderr


def test_resize_vocab_grows_the_embeddings_and_trains_them(tmp_path: Path, output_root: Path) -> None:
    """An added token: the embeddings grow to the tokenizer and train whole beside the LoRA adapter."""
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from trainer.tiny import ensure_tiny_model

    model = tmp_path / "model"
    shutil.copytree(ensure_tiny_model(compose([]).model.tiny), model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tokenizer.save_pretrained(model)
    result = run_cli("quant=none", "model=local", f"model.name_or_path={model}", "model.resize_vocab=true",
                     "train.max_steps=2", "do_eval=false", "data.eval_fraction=0", f"output_root={output_root}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"vocabulary: {rows} -> " in result.stderr
    from tests.conftest import only_run_dir

    saved = load_file(str(only_run_dir(output_root) / "adapter" / "adapter_model.safetensors"))
    embed = [w for name, w in saved.items() if "embed_tokens" in name]
    assert embed and embed[0].shape[0] >= rows + 1  # the grown embedding travels with the adapter
    refused = run_cli("quant=bnb4", "model.resize_vocab=true", "dry_run=true")
    assert refused.returncode == 2 and "[quant.no_resize_vocab]" in refused.stderr
