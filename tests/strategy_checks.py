"""Checks shared by the multi-process strategy and resume tests: outputs of a finished run dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


def metrics(run_dir: Path) -> Dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


def launcher_stderr(run_dir: Path) -> str:
    """What a finished_run job printed to stderr (every rank's, through torchrun)."""
    return (run_dir.parent / f"{run_dir.name}.stderr").read_text()


def train_losses(run_dir: Path) -> List[float]:
    return [e["loss"] for e in metrics(run_dir)["log_history"] if "loss" in e]


def reload_logits(run_dir: Path) -> Any:
    """Load the base model the way the run did (same quantization), attach the saved adapter, run the probe.

    Returns (reloaded logits, the trained model's logits saved by the run, base logits without the adapter).
    """
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tests.probes import FIXED_LOGITS_FILE
    from trainer.quant.bnb import from_pretrained as bnb_from_pretrained

    plan = json.loads((run_dir / ".hydra" / "plan.json").read_text())
    source = plan["model"]["source"]
    kwargs: Dict[str, Any] = {"dtype": getattr(torch, plan["compute_dtype"])}
    bnb = plan["quant"]["load_kwargs"] if plan["quant"]["method"] == "bnb" else None
    # Through qforge's own bnb loader, which pins the same CPU kernels the run trained with.
    base = bnb_from_pretrained(source, bnb, kwargs) if bnb else AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if plan["model"]["upcast_layernorm"]:
        for name, module in base.named_modules():
            if "norm" in type(module).__name__.lower() or name.endswith("norm"):
                module.to(torch.float32)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    saved = load_file(str(run_dir / FIXED_LOGITS_FILE))
    with torch.no_grad():
        logits = model(input_ids=saved["input_ids"]).logits.float()
        with model.disable_adapter():
            base_logits = model(input_ids=saved["input_ids"]).logits.float()
    return logits, saved["logits"], base_logits


# ---- running 2-process jobs (real torchrun, gloo), each at most once per pytest process ----

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STEPS = 8
SAVE_STEPS = 4
_ROOT = Path(tempfile.mkdtemp(prefix="qforge-strategies-"))
_FINISHED: Dict[tuple, Path] = {}


def overrides(strategy: str, quant: str, run_dir: Path, save_steps: int = SAVE_STEPS) -> List[str]:
    """A short 2-process run that still checkpoints (every save_steps) and logs every step."""
    return ["launcher=torchrun", "launcher.nproc_per_node=2", f"strategy={strategy}", f"quant={quant}", "peft=lora",
            f"train.max_steps={STEPS}", f"train.save_steps={save_steps}", f"train.eval_steps={STEPS}",
            "train.logging_steps=1", "train.max_seq_len=128", "train.lr=2e-3", "train.warmup_ratio=0",
            # The fused LoRA branch (auto would skip it on this tiny model) wherever the strategy allows it.
            f"train.fused_lora={'null' if strategy.startswith('zero3') else 'true'}", f"run_dir={run_dir}",
            # Observed from outside (tests/probes.py): the trained logits, each rank's parameters and imports.
            "train.callbacks=[tests.probes:fixed_logits,tests.probes:rank_params,tests.probes:rank_imports]"]


def kill_tree(proc: subprocess.Popen) -> None:
    """Like a node failure: the launcher, torchrun's agent and every rank die at once, no cleanup (torchrun's
    workers leave the launcher's process group, so killing the group would miss them)."""
    import psutil

    for process in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def command(strategy: str, quant: str, run_dir: Path, save_steps: int = SAVE_STEPS,
            extra: Sequence[str] = ()) -> List[str]:
    return [sys.executable, str(REPO / "train.py"), *overrides(strategy, quant, run_dir, save_steps), *extra]


def finished_run(strategy: str, quant: str, cpu_env: Optional[Dict[str, str]] = None,
                 extra: Sequence[str] = ()) -> Path:
    """Run (once) an uninterrupted 2-process job; returns its run dir. Fails with the job's output.

    cpu_env caps the CPU kernels' instruction set (tests.conftest.cpu_paths); each path is its own run, and so is
    each set of extra overrides.
    """
    cpu_env = dict(cpu_env or {})
    key = (strategy, quant, tuple(sorted(cpu_env.items())), tuple(extra))
    if key not in _FINISHED:
        suffix = ("-avx2" if cpu_env else "") + "".join(f"-{e.replace('=', '_')}" for e in extra)
        run_dir = _ROOT / f"{strategy}-{quant}{suffix}"
        proc = subprocess.run(command(strategy, quant, run_dir, extra=extra), cwd=REPO, capture_output=True,
                              text=True, timeout=600, env={**os.environ, **cpu_env})
        assert proc.returncode == 0, f"{strategy}/{quant}{suffix} failed:\n{proc.stderr[-4000:]}"
        (_ROOT / f"{run_dir.name}.stderr").write_text(proc.stderr)
        _FINISHED[key] = run_dir
    return _FINISHED[key]
