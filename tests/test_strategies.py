"""ddp, fsdp, zero2 and zero3 as real 2-process torchrun jobs on CPU (gloo), with LoRA and with bnb4 QLoRA.

Each job is used for every check: it finishes, its loss falls, FSDP/DeepSpeed really sharded (their
checkpoint formats), the checkpoints are marked complete, and the saved adapter, loaded with
PeftModel.from_pretrained onto a freshly loaded base, reproduces the trained model's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import cpu_paths, run_cli
from tests.strategy_checks import STEPS, finished_run, launcher_stderr, metrics, reload_logits, train_losses

CASES = [(s, q) for s in ("ddp", "fsdp", "zero2", "zero3") for q in ("none", "bnb4")]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,quant", CASES, ids=[f"{s}-{q}" for s, q in CASES])
def test_strategy_trains_and_saves_a_loadable_adapter(strategy: str, quant: str) -> None:
    check_strategy_run(strategy, quant, {})


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
@pytest.mark.parametrize("cpu_env", [p for p in cpu_paths() if p.id != "cpu-native"])
def test_bnb4_strategy_on_avx2_kernels(strategy: str, cpu_env: dict) -> None:
    """The bnb4 cases once more with torch, oneDNN, MKL and bitsandbytes capped at AVX2 (tests.conftest)."""
    check_strategy_run(strategy, "bnb4", cpu_env)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_chunked_loss_under_sharded_strategies_trains_like_the_stock_head(strategy: str) -> None:
    """The chunked loss reads lm_head.weight itself, which FSDP2 leaves sharded and ZeRO-3 gathers only inside a
    forward (trainer/fused_loss.py): step by step, the same losses and gradient norms as the stock head."""
    chunked = finished_run(strategy, "bnb4")
    stock = finished_run(strategy, "bnb4", extra=["train.fused_ce=false"])
    for run_dir, fused in ((chunked, True), (stock, False)):
        plan = json.loads((run_dir / ".hydra" / "plan.json").read_text())
        assert plan["speed"]["fused_cross_entropy"] is fused
        assert ("chunked linear cross-entropy" in (run_dir / "train.log").read_text()) is fused
    steps = [[(e["loss"], e["grad_norm"]) for e in metrics(run_dir)["log_history"] if "loss" in e]
             for run_dir in (chunked, stock)]
    assert len(steps[0]) == len(steps[1]) == STEPS
    for (loss, norm), (stock_loss, stock_norm) in zip(*steps):
        assert loss == pytest.approx(stock_loss, rel=1e-4) and norm == pytest.approx(stock_norm, rel=1e-3)


def check_strategy_run(strategy: str, quant: str, cpu_env: dict) -> None:
    run_dir = finished_run(strategy, quant, cpu_env)
    m = metrics(run_dir)
    assert m["world_size"] == 2 and m["steps"] == STEPS

    # Library deprecation chatter is silenced by its exact text (trainer/library_noise.py); nothing else is.
    assert "FutureWarning" not in launcher_stderr(run_dir) and "DeprecationWarning" not in launcher_stderr(run_dir)

    losses = train_losses(run_dir)
    assert len(losses) == STEPS
    assert min(losses[-3:]) < losses[0] - 0.1, f"loss did not fall: {losses}"

    plan = json.loads((run_dir / ".hydra" / "plan.json").read_text())
    assert plan["strategy"]["dist_backend"] == "gloo"
    checkpoint = run_dir / "checkpoints" / "checkpoint-4"
    assert (checkpoint / "qforge_complete.json").is_file()
    if strategy == "fsdp":  # sharded checkpoint: one file per rank, written by torch.distributed.checkpoint
        assert sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp")) == \
            ["__0_0.distcp", "__1_0.distcp"]
    elif strategy.startswith("zero"):  # DeepSpeed's own checkpoint, one optimizer partition per rank
        assert len(list((checkpoint / "global_step4").glob("*optim_states.pt"))) == 2
        assert json.loads((run_dir / "deepspeed.json").read_text())["zero_optimization"]["stage"] == int(strategy[-1])

    reloaded, trained, base = reload_logits(run_dir)
    assert torch.allclose(reloaded, trained, atol=1e-4), (reloaded - trained).abs().max()
    assert not torch.allclose(base, trained, atol=1e-3)  # the adapter learned something, so the match means it

    # Only the launcher composed and validated: each rank read the plan (python -m trainer.rank RUN_DIR).
    imports = [json.loads((run_dir / f"rank_imports-{r}.json").read_text()) for r in range(2)]
    for seen in imports:
        assert seen["imported"] == [], seen
        assert seen["argv"][-1] == str(run_dir) and seen["argv"][0].endswith("trainer/rank.py"), seen["argv"]
    # The ranks trained together: after the last step their trainable parameters are the same bytes
    # (for FSDP each rank's full tensors). A rank that trained on its own would differ.
    params = [json.loads((run_dir / f"rank_params-{r}.json").read_text()) for r in range(2)]
    assert params[0]["tensors"] > 0 and params[0]["sha256"] == params[1]["sha256"], params


def test_torchrun_arguments_one_node_and_many() -> None:
    from launchers.torchrun import torchrun_argv
    from trainer.specs import LauncherSpec

    one = torchrun_argv(LauncherSpec("torchrun", 2, 1, 0, None, None, None), "/runs/x=1")
    assert one[:3] == ["--nproc-per-node=2", "--nnodes=1", "--standalone"]
    assert one[-3:] == ["--module", "trainer.rank", "/runs/x=1"]  # every rank reads the one plan
    many = torchrun_argv(LauncherSpec("torchrun", 8, 2, 1, "head:29500", "job7", None), "/runs/y")
    assert "--rdzv-backend=c10d" in many and "--rdzv-endpoint=head:29500" in many and "--rdzv-id=job7" in many
    assert not any(a.startswith("--node-rank") for a in many)  # c10d numbers the nodes itself


def test_dry_run_shows_the_launch(tmp_path: Path) -> None:
    shown = run_cli("launcher=torchrun", "launcher.nnodes=2", "launcher.node_rank=1",
                    "launcher.rdzv_endpoint=head:29500", "launcher.rdzv_id=job7", "launcher.nproc_per_node=auto",
                    "strategy=fsdp", "dry_run=true", f"output_root={tmp_path}")
    assert shown.returncode == 0, shown.stderr
    plan = yaml.safe_load(shown.stdout)
    assert {k: plan["launcher"][k] for k in ("name", "nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint",
                                             "rdzv_id")} == {"name": "torchrun", "nproc_per_node": 1, "nnodes": 2,
                                                             "node_rank": 1, "rdzv_endpoint": "head:29500",
                                                             "rdzv_id": "job7"}  # auto: 1 process without GPUs
    assert plan["world_size"] == 2 and plan["strategy"]["fsdp_config"]["fsdp_version"] == 2
    assert not list(tmp_path.iterdir())  # a dry run creates nothing
    refused = run_cli("launcher=torchrun", "launcher.nnodes=2", "dry_run=true")
    assert refused.returncode == 2 and "launcher.multinode_rendezvous" in refused.stderr


@pytest.mark.slow
def test_a_failing_rank_fails_the_launch_with_its_own_message(tmp_path: Path) -> None:
    """A problem only a rank can find (a tokenizer.json that is JSON but no tokenizer) is the rank's sentence."""
    import shutil

    from trainer.compose import compose
    from trainer.tiny import ensure_tiny_model

    model = tmp_path / "model"
    shutil.copytree(ensure_tiny_model(compose([]).model.tiny), model)
    (model / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    failed = run_cli("launcher=torchrun", "launcher.nproc_per_node=2", "strategy=ddp", "model=local",
                     f"model.name_or_path={model}", f"run_dir={tmp_path / 'run'}", timeout=300)
    assert failed.returncode == 1  # the rank's own exit code (a UserError), passed on by the parent
    assert "could not load the tokenizer" in failed.stderr and "torchrun failed (exit code 1)" in failed.stderr
    assert "Traceback" not in failed.stderr


@pytest.mark.slow
def test_compiled_layers_under_ddp_train_like_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.compile under DDP (2 processes, gloo): DDP's gradient hooks still fire on the compiled layers' weights,
    every rank runs one graph, and the losses are the eager run's."""
    import re

    eager = finished_run("ddp", "bnb4")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    compiled = finished_run("ddp", "bnb4", extra=["train.compile=true", "train.fused_lora=null"])
    log = (compiled / "train.log").read_text()
    assert "share one compiled forward" in log
    assert re.search(r"torch\.compile: first step [\d.]+ s with compiling; 1 graphs, 0 graph breaks", log), log
    assert train_losses(compiled) == pytest.approx(train_losses(eager), rel=1e-3)
