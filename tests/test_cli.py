"""The command line as a user meets it: dry runs, refusals, typos, the console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO, run_cli


def test_bnb8_with_fsdp_is_refused_with_rule_and_fix(output_root: Path) -> None:
    result = run_cli("quant=bnb8", "strategy=fsdp", "dry_run=true", f"output_root={output_root}")
    assert result.returncode == 2
    line = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert "[bnb.8bit_not_sharded]" in line and "8-bit" in line and "fsdp" in line and "Fix:" in line
    assert "Traceback" not in result.stderr
    assert not output_root.exists()


def test_illegal_run_creates_nothing_even_without_dry_run(output_root: Path) -> None:
    result = run_cli("quant=hqq", "strategy=zero3", "peft=full", f"output_root={output_root}")
    assert result.returncode == 2
    rules = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(rules) == 2, result.stderr  # both violations, not just the first
    assert not output_root.exists()


def test_bnb4_fsdp_dry_run_plans_quant_storage_equal_to_compute_dtype(output_root: Path) -> None:
    result = run_cli("quant=bnb4", "strategy=fsdp", "dry_run=true", f"output_root={output_root}")
    assert result.returncode == 0, result.stderr
    plan = yaml.safe_load(result.stdout)
    bnb = plan["quant"]["load_kwargs"]
    assert bnb["bnb_4bit_quant_storage"] == bnb["bnb_4bit_compute_dtype"] == plan["compute_dtype"]
    assert plan["strategy"]["name"] == "fsdp" and plan["world_size"] >= 1
    assert plan["training_args"]["output_dir"].startswith(plan["run_dir"])
    assert {"model", "peft", "data", "launcher"} <= set(plan)
    assert not output_root.exists()  # a dry run loads nothing and writes nothing


def test_compute_dtype_override_flows_into_quant_storage(output_root: Path) -> None:
    result = run_cli("quant=bnb4", "quant.compute_dtype=bfloat16", "dry_run=true", f"output_root={output_root}")
    plan = yaml.safe_load(result.stdout)
    assert plan["quant"]["load_kwargs"]["bnb_4bit_quant_storage"] == "bfloat16"
    assert plan["training_args"]["bf16"] is True


def test_typo_and_wrong_type_fail_at_compose_time(output_root: Path) -> None:
    typo = run_cli("quant.bitz=4", "dry_run=true", f"output_root={output_root}")
    assert typo.returncode != 0 and "bitz" in typo.stderr
    wrong_type = run_cli("quant.bits=four", "dry_run=true", f"output_root={output_root}")
    assert wrong_type.returncode != 0 and "quant.bits" in wrong_type.stderr
    bad_choice = run_cli("quant.quant_type=nf5", "dry_run=true", f"output_root={output_root}")
    assert bad_choice.returncode != 0 and "nf5" in bad_choice.stderr
    assert not output_root.exists()


def test_validation_and_planning_do_not_import_torch() -> None:
    code = (
        "import sys; from trainer.compose import compose; from trainer.validate import validate; "
        "from trainer.plan import build_plan; cfg = compose(['quant=bnb4', 'strategy=zero3']); "
        "validate(cfg); build_plan(cfg); "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_console_script_behaves_like_train_py(output_root: Path) -> None:
    args = ("quant=hqq", "quant.bits=3", "dry_run=true", f"output_root={output_root}",
            f"run_dir={output_root}/fixed")  # a path of its own: a shared /tmp one may hold other files
    via_script = run_cli(*args, console_script=True)
    via_train = run_cli(*args)
    assert via_script.returncode == via_train.returncode == 0, via_script.stderr
    assert yaml.safe_load(via_script.stdout) == yaml.safe_load(via_train.stdout)


def test_experiment_overlay_changes_only_what_it_says(output_root: Path) -> None:
    result = run_cli("experiment=tiny_qlora_fast", "dry_run=true", f"output_root={output_root}")
    plan = yaml.safe_load(result.stdout)
    assert plan["training_args"]["max_steps"] == 30
    assert plan["quant"]["method"] == "bnb"
    assert plan["training_args"]["per_device_train_batch_size"] == 4  # untouched default


def test_every_experiment_preset_composes_and_validates(output_root: Path) -> None:
    """Each shipped preset is a legal composition (dry run: no model is loaded)."""
    presets = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
    assert "llama3_8b_qlora_1gpu" in presets
    for preset in presets:
        result = run_cli(f"experiment={preset}", "dry_run=true", f"output_root={output_root}")
        assert result.returncode == 0, (preset, result.stdout, result.stderr)
