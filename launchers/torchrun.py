"""launcher=torchrun: start every rank of a planned run under torch.distributed.run.

The parent (trainer/entry.py) validated and planned once; this creates the one run dir, writes the plan into
it, and runs torchrun's elastic agent in this process. Every rank runs `python -m trainer.rank RUN_DIR`, which
reads that plan and trains: no rank composes again or makes a Hydra dir of its own (lightning-hydra-template
#393), and only rank 0 writes logs, plots, metrics and wandb. The parent's exit code is the failing rank's.
"""

from __future__ import annotations

import logging
import shlex
import signal
import sys
from pathlib import Path
from typing import List

from trainer import checkpoints, rundir
from trainer.preemption import INTERRUPT_EXIT_CODE
from trainer.rundir import Composition
from trainer.specs import LauncherSpec, RunPlan

log = logging.getLogger(__name__)

RANK_MODULE = "trainer.rank"


def run_torchrun(plan: RunPlan, composition: Composition) -> None:
    made = rundir.dirs_to_make(Path(plan.run_dir))
    rundir.create(plan, composition)
    argv = torchrun_argv(plan.launcher, plan.run_dir)
    log.info("run dir: %s", plan.run_dir)
    log.info("torchrun %s", " ".join(shlex.quote(a) for a in argv))
    try:
        code = _run_agent(argv)
    except KeyboardInterrupt:
        from launchers.local import interrupted_line

        line = interrupted_line(composition.overrides, plan.run_dir)
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


def torchrun_argv(launcher: LauncherSpec, run_dir: str) -> List[str]:
    """Arguments for torch.distributed.run: one node, or a c10d rendezvous across nodes."""
    argv = [f"--nproc-per-node={launcher.nproc_per_node}", f"--nnodes={launcher.nnodes}"]
    if launcher.rdzv_endpoint:
        # c10d assigns node ranks itself and ignores --node-rank; every node passes the same id.
        argv += ["--rdzv-backend=c10d", f"--rdzv-endpoint={launcher.rdzv_endpoint}",
                 f"--rdzv-id={launcher.rdzv_id or 'qforge'}"]
    elif int(launcher.nnodes) > 1:
        argv += [f"--node-rank={launcher.node_rank}"]
    else:
        # One node: a free port picked by torchrun, so two runs on one machine do not collide.
        argv += ["--standalone"]
    return [*argv, "--module", RANK_MODULE, run_dir]


def _run_agent(argv: List[str]) -> int:
    """Run torchrun's agent here; a failed rank becomes a summary line, not the agent's traceback."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

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
