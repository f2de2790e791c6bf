"""Multi-node torchrun for real on one host: two node agents (`launcher.nnodes=2`, one process each, gloo, a c10d
rendezvous on 127.0.0.1) train one run into one run dir, their gradients synchronised: the adapter equals the one
a 2-process single-node run of the same work trains. A second physical node cannot exist here; two agents with
their own node ranks exercise the same launcher, rendezvous and rank path."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO

WORK = ["strategy=ddp", "quant=bnb4", "peft=lora", "train.max_steps=6", "train.save_steps=3", "train.logging_steps=1",
        "train.max_seq_len=128", "train.lr=2e-3", "train.warmup_ratio=0", "do_eval=false", "data.eval_fraction=0",
        "train.callbacks=[tests.probes:rank_params,tests.probes:rank_imports]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train(args: List[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_node_agents_on_one_host_train_one_run_like_one_node(tmp_path: Path) -> None:
    run_dir = tmp_path / "two-nodes"
    port = _free_port()
    nodes = [_train([*WORK, "launcher=torchrun", "launcher.nproc_per_node=1", "launcher.nnodes=2",
                     f"launcher.node_rank={rank}", f"launcher.rdzv_endpoint=127.0.0.1:{port}",
                     "launcher.rdzv_id=qforge-test", f"run_dir={run_dir}", f"output_root={tmp_path}"])
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert all("finished on 2 processes" in o for o in outputs)

    # One run dir, one set of outputs: both agents wrote into it, rank 0 alone wrote the outputs.
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["two-nodes"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 6
    plan = json.loads((run_dir / ".hydra" / "plan.json").read_text())
    assert plan["world_size"] == 2 and plan["launcher"]["nnodes"] == 2
    imports = [json.loads((run_dir / f"rank_imports-{r}.json").read_text()) for r in range(2)]
    assert all(seen["imported"] == [] for seen in imports)  # the ranks read the plan; only launchers composed
    params = [json.loads((run_dir / f"rank_params-{r}.json").read_text()) for r in range(2)]
    assert params[0]["sha256"] == params[1]["sha256"]  # gradients synchronised across the two nodes

    one_node = tmp_path / "one-node"
    single = _train([*WORK, "launcher=torchrun", "launcher.nproc_per_node=2", f"run_dir={one_node}",
                     f"output_root={tmp_path}"])
    out = single.communicate(timeout=600)[0]
    assert single.returncode == 0, out[-3000:]
    two = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    one = load_file(str(one_node / "adapter" / "adapter_model.safetensors"))
    assert two.keys() == one.keys()
    for key in two:
        assert torch.allclose(two[key], one[key], atol=1e-6), key
    steps = [(e["step"], e["grad_norm"]) for e in metrics["log_history"] if "grad_norm" in e]
    reference = json.loads((one_node / "metrics.json").read_text())
    assert steps == [(e["step"], pytest.approx(e["grad_norm"], rel=1e-5)) for e in reference["log_history"]
                     if "grad_norm" in e]
