"""What a run leaves behind for people: metrics.json, loss.png, and the wandb run.

Only the main process (rank 0) writes any of it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Dict, List, Optional

log = logging.getLogger(__name__)

def write_metrics(run_dir: str, metrics: Dict[str, Any]) -> Path:
    path = Path(run_dir) / "metrics.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)  # metrics.json marks a finished run: it appears whole or not at all
    return path


def plot_losses(run_dir: str, history: List[Dict[str, Any]], title: str,
                eval_before: Optional[float] = None) -> Optional[Path]:
    """Train and eval loss against optimizer step, from the Trainer's log history.

    The eval before training (step 0) is not in the history: train() starts a fresh one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    if eval_before is not None and not any(step == 0 for step, _ in evals):
        evals.insert(0, (0, eval_before))
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(run_dir) / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


DEFAULT_WANDB_SERVER = "https://api.wandb.ai"
PROBE_SECONDS = 3.0


def wandb_server() -> str:
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_WANDB_SERVER


def server_reachable(url: str, timeout: float = PROBE_SECONDS) -> bool:
    """Can this host open a TCP connection to the wandb server? (Compute nodes often have no internet.)"""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url if "://" in url else f"https://{url}")
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode(requested: str, run_dir: str) -> str:
    """The mode this rank logs in; never prompts. Decided before the model loads.

    auto: online when an API key is configured and the wandb server answers from this host; with a key but
    no route to the server (a compute node without internet), offline with one warning line, to be synced
    later. online: the same check, but no route stops the run with one sentence. offline, disabled: as said.
    """
    if requested in ("offline", "disabled"):
        return requested
    wants_online = requested == "online" or bool(os.environ.get("WANDB_API_KEY")) \
        or os.environ.get("WANDB_MODE") == "online"
    if not wants_online:
        return "offline"
    server = wandb_server()
    if server_reachable(server):
        return "online"
    if requested == "online":
        from trainer.errors import UserError

        raise UserError(f"logger.mode=online, but the wandb server {server} cannot be reached from this host; "
                        "use logger.mode=auto (logs offline here, sync later) or logger.mode=offline.")
    log.warning("wandb: %s cannot be reached from this host; logging offline into %s/wandb (sync later with: "
                "wandb sync %s/wandb/offline-run-*)", server, run_dir, run_dir)
    return "offline"


def make_wandb_callback(plan: Any, resolved_config: Dict[str, Any], mode: str) -> Any:
    from transformers import TrainerCallback

    class WandbCallback(TrainerCallback):
        """Logs the config with quant/peft/strategy tags, every logging step, and the final metrics."""

        def __init__(self) -> None:
            self.run: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero and self.run is None:
                self.start()

        def start(self) -> None:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            run_id_file = Path(plan.run_dir) / "wandb_run_id"
            # A requeued or resumed run continues the same wandb run instead of starting a new one.
            run_id = run_id_file.read_text().strip() if run_id_file.exists() else secrets.token_hex(4)
            run_id_file.write_text(run_id)
            self.run = wandb.init(
                project=plan.logger.project,
                entity=plan.logger.entity,
                group=plan.logger.group,
                name=plan.run_name,
                id=run_id,
                resume="allow",
                dir=plan.run_dir,
                mode=mode,
                tags=plan.logger.tags,
                config=scrub(resolved_config),
                settings=wandb.Settings(silent=True, console="off"),
            )

        def on_log(self, args: Any, state: Any, control: Any, logs: Optional[Dict[str, Any]] = None,
                   **kwargs: Any) -> None:
            if self.run is None or not logs:
                return
            numbers = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
            self.run.log(numbers, step=state.global_step)

        def finish(self, final: Dict[str, Any]) -> None:
            if self.run is None:
                self.start()
            for key, value in final.items():
                if isinstance(value, (int, float)):
                    self.run.summary[key] = value
            self.run.finish()

    return WandbCallback()


def scrub(config: Dict[str, Any]) -> Dict[str, Any]:
    """Drop anything that looks like a secret before a config leaves the process."""
    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items()
                    if not any(word in str(k).lower() for word in ("token", "api_key", "password", "secret"))}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return node

    return clean(config)
