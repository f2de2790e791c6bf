"""logger=wandb for real, offline (no key here): config, tags, per-step and final metrics land in the run file."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import only_run_dir, run_cli
from tests.wandb_records import item_key, records


def test_wandb_offline_run_holds_config_tags_and_metrics(output_root: Path) -> None:
    result = run_cli("logger=wandb", "quant=bnb4", "peft=lora", "train.max_steps=10", "train.logging_steps=2",
                     "train.eval_steps=5", f"output_root={output_root}")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(output_root)
    [run_file] = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    logged = list(records(run_file))

    [run] = [r.run for r in logged if r.HasField("run")]
    assert {"bnb", "lora", "single"} <= set(run.tags)
    updates = list(run.config.update) + [item for r in logged if r.HasField("config") for item in r.config.update]
    config = {item_key(item): json.loads(item.value_json) for item in updates}
    assert config["quant"]["method"] == "bnb" and config["peft"]["r"] == 16

    history = [{item_key(item): json.loads(item.value_json) for item in r.history.item}
               for r in logged if r.HasField("history")]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) >= 4, history  # one per logging step
    assert any("eval_loss" in h for h in history)

    summary = {item_key(item): json.loads(item.value_json) for r in logged if r.HasField("summary")
               for item in r.summary.update}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert abs(summary["eval_loss"] - metrics["eval_loss"]) < 1e-6
    assert "tokens_per_second" in summary


def test_no_secret_reaches_the_run_dir(output_root: Path) -> None:
    secret = "sk-test-do-not-leak-123"
    result = run_cli("logger=wandb", "logger.mode=offline", "train.max_steps=2", "do_eval=false",
                     "data.eval_fraction=0", f"output_root={output_root}",
                     env={"HF_TOKEN": secret, "WANDB_API_KEY": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(output_root)
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".json", ".wandb", ".log", ".txt"):
            assert secret.encode() not in path.read_bytes(), path


def test_a_key_without_a_route_to_wandb_logs_offline_with_one_warning(output_root: Path) -> None:
    """logger.mode=auto with WANDB_API_KEY set on a host that cannot reach the server (a compute node)."""
    result = run_cli("logger=wandb", "train.max_steps=2", "do_eval=false", "data.eval_fraction=0",
                     f"output_root={output_root}",
                     env={"WANDB_API_KEY": "fake-key-for-test", "WANDB_BASE_URL": "http://127.0.0.1:9"})
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(output_root)
    warned = [line for line in result.stderr.splitlines() if "cannot be reached from this host" in line]
    assert len(warned) == 1 and "wandb sync" in warned[0] and "Traceback" not in result.stderr
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))  # logged offline, to sync later
