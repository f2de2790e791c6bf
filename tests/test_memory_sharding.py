"""The memory model's sharding terms against real 2-process CPU runs (gloo) of ddp, fsdp, zero2 and zero3.

Each run trains the tiny model through qforge's own run path under torchrun (tests/memory_probe.py) and each
rank reports the bytes of its parameter storage (trainable, frozen), its optimizer state and DeepSpeed's fp32
master copy after two optimizer steps; trainer.memory predicts the same four numbers for the composition.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from trainer import memory
from trainer.compose import compose

CASES = [("ddp", "none"), ("fsdp", "none"), ("fsdp", "bnb4"), ("zero2", "none"), ("zero3", "none"),
         ("zero3", "bnb4")]


def overrides(strategy: str, quant: str) -> list:
    return ["launcher=torchrun", "launcher.nproc_per_node=2", f"strategy={strategy}", f"quant={quant}",
            "train.max_steps=2", "do_eval=false", "data.eval_fraction=0", "train.save_steps=100",
            "train.max_seq_len=128", f"train.fused_lora={'null' if strategy.startswith('zero3') else 'true'}"]


def predicted(strategy: str, quant: str) -> dict:
    p = memory.predict(compose(overrides(strategy, quant)), device="cpu")
    static = {t.name: t.bytes for t in p.static}

    def pick(*prefixes: str) -> float:
        return sum(v for k, v in static.items() if k.startswith(prefixes))

    return {"trainable_param_bytes": pick("LoRA"),
            "frozen_param_bytes": pick("base weights", "embeddings", "lm_head", "norms"),
            "optimizer_state_bytes": pick("optimizer state"),
            "optimizer_master_bytes": pick("DeepSpeed fp32 master")}


@pytest.mark.slow
@pytest.mark.parametrize("strategy,quant", CASES, ids=[f"{s}-{q}" for s, q in CASES])
def test_per_rank_parameter_and_optimizer_bytes_match_the_model(strategy: str, quant: str, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m",
               "tests.memory_probe", str(tmp_path), *overrides(strategy, quant)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = predicted(strategy, quant)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for found in ranks:
        assert found["world_size"] == 2
        for key, value in expected.items():
            assert found[key] == pytest.approx(value, rel=1e-6, abs=1), (key, found, expected)
    full = predicted("ddp", quant)
    if strategy != "ddp":  # sharding really happened, in what the strategy shards
        assert ranks[0]["optimizer_state_bytes"] == pytest.approx(full["optimizer_state_bytes"] / 2)
    if strategy in ("fsdp", "zero3"):
        assert ranks[0]["frozen_param_bytes"] < 0.6 * full["frozen_param_bytes"]
