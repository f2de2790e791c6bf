"""launcher=torchrun: re-execute the validated composition under torch.distributed.run.

The parent validates once (trainer/entry.py), creates the one run dir, then starts torchrun's
elastic agent in this process. Every rank runs `python -m launchers.torchrun <the same overrides>
run_dir=<that dir>` with QFORGE_CHILD=1, which composes the same config and trains in-process:
no rank makes a Hydra dir of its own (lightning-hydra-template #393), and only rank 0 writes logs,
plots, metrics and wandb. The parent's exit code is torchrun's.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, Dict, List

from trainer import checkpoints, rundir
from trainer.plan import RunPlan
from trainer.preemption import INTERRUPT_EXIT_CODE

log = logging.getLogger(__name__)

CHILD_ENV = "QFORGE_CHILD"


def is_child() -> bool:
    return os.environ.get(CHILD_ENV) == "1"


def run_torchrun(cfg: Any, plan: RunPlan, overrides: List[str]) -> None:
    if is_child():
        run_rank(cfg, plan)
        return
    made = rundir.dirs_to_make(Path(plan.run_dir))
    rundir.create(plan.run_dir, cfg, overrides, plan.to_dict())
    argv = torchrun_argv(plan.launcher, child_overrides(overrides, plan.run_dir))
    log.info("run dir: %s", plan.run_dir)
    log.info("torchrun %s", " ".join(shlex.quote(a) for a in argv))
    try:
        code = _run_agent(argv)
    except KeyboardInterrupt:
        from launchers.local import interrupted_line

        line = interrupted_line(overrides, plan.run_dir)
        if not checkpoints.complete_checkpoints(checkpoints.checkpoint_dir(plan.run_dir)):
            rundir.remove_made(made)
        print(line, file=sys.stderr)
        sys.exit(INTERRUPT_EXIT_CODE)
    if code != 0:
        print(f"qforge: torchrun failed (exit code {code}); the failing rank's error is printed above "
              f"and the run dir {plan.run_dir} is kept, so re-running the same command resumes it.",
              file=sys.stderr)
        sys.exit(code)
    print(f"qforge: finished on {plan.world_size} processes.\nqforge: outputs in {plan.run_dir}", file=sys.stderr)


def child_overrides(overrides: List[str], run_dir: str) -> List[str]:
    """The parent's overrides with the run dir pinned, so every rank writes to the same place."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith("run_dir=")]
    # Quoted for Hydra's override grammar: a path may hold characters such as '=' or ','.
    escaped = run_dir.replace("\\", "\\\\").replace("'", "\\'")
    return [*kept, f"run_dir='{escaped}'"]


def torchrun_argv(launcher: Dict[str, Any], overrides: List[str]) -> List[str]:
    """Arguments for torch.distributed.run: one node, or a c10d rendezvous across nodes."""
    argv = [f"--nproc-per-node={launcher['nproc_per_node']}", f"--nnodes={launcher['nnodes']}"]
    if launcher.get("rdzv_endpoint"):
        # c10d assigns node ranks itself and ignores --node-rank; every node passes the same id.
        argv += ["--rdzv-backend=c10d", f"--rdzv-endpoint={launcher['rdzv_endpoint']}",
                 f"--rdzv-id={launcher.get('rdzv_id') or 'qforge'}"]
    elif int(launcher["nnodes"]) > 1:
        argv += [f"--node-rank={launcher['node_rank']}"]
    else:
        # One node: a free port picked by torchrun, so two runs on one machine do not collide.
        argv += ["--standalone"]
    return [*argv, "--module", "launchers.torchrun", *overrides]


def _run_agent(argv: List[str]) -> int:
    """Run torchrun's agent here; a failed rank becomes a summary line, not the agent's traceback."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    previous = os.environ.get(CHILD_ENV)
    os.environ[CHILD_ENV] = "1"  # inherited by the ranks; restored so a -m sweep's next job is a parent
    try:
        run(parse_args(argv))
        return 0
    except SignalException as err:
        # Ctrl-C (or a SIGTERM) reached the agent; it passed it on and waited for the ranks to stop.
        if err.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        print(f"qforge: torchrun stopped by signal {err.sigval.name}; the ranks were stopped.", file=sys.stderr)
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        if all(f.exitcode == INTERRUPT_EXIT_CODE for f in err.failures.values()):
            raise KeyboardInterrupt from None  # every rank stopped on Ctrl-C at a checkpoint
        for rank, failure in sorted(err.failures.items()):
            print(f"qforge: rank {rank} (pid {failure.pid}) exited with code {failure.exitcode}", file=sys.stderr)
        codes = [f.exitcode for f in err.failures.values() if f.exitcode and f.exitcode > 0]
        return codes[0] if codes else 1
    finally:
        if previous is None:
            os.environ.pop(CHILD_ENV, None)
        else:
            os.environ[CHILD_ENV] = previous


def run_rank(cfg: Any, plan: RunPlan) -> None:
    """One rank: the parent already made the run dir; rank 0 alone logs to it."""
    from trainer.run import train

    if int(os.environ.get("RANK", "0")) == 0:
        from launchers.local import _log_to_file

        _log_to_file(plan.run_dir)
    else:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        train(cfg, plan)
    except KeyboardInterrupt:
        sys.exit(INTERRUPT_EXIT_CODE)  # the launcher prints the one line; a rank prints no traceback


if __name__ == "__main__":
    # A rank started by torchrun: the same composition, trained in this process.
    from trainer.cli import main

    main()
