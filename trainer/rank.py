"""One rank of a launched run: `python -m trainer.rank RUN_DIR`.

torchrun (launchers/torchrun.py) and the sbatch script (slurm/train.sbatch) start this on every process. It
reads the plan its launcher wrote (RUN_DIR/.hydra/plan.json), checks that this qforge wrote it and that the
process layout is the planned one, and trains. A rank never composes, validates or plans again: what the
launcher printed in its dry run is what every rank runs.
"""

from __future__ import annotations

import logging
import os
import sys

from trainer.errors import UserError
from trainer.preemption import INTERRUPT_EXIT_CODE
from trainer.specs import RunPlan, qforge_version

log = logging.getLogger("qforge")


def read_plan(run_dir: str) -> RunPlan:
    plan = RunPlan.read(run_dir)
    if plan.qforge_version != qforge_version():
        raise UserError(f"{run_dir} was planned by qforge {plan.qforge_version}, but this is qforge "
                        f"{qforge_version()}; launch it again with this version (python train.py ... "
                        f"run_dir={run_dir}).")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != plan.world_size:
        raise UserError(f"{run_dir} was planned for {plan.world_size} process(es), but this rank is one of "
                        f"{world}; launch it again so the plan matches the allocation.")
    return plan


def run_rank(plan: RunPlan) -> None:
    """Train this rank; rank 0 alone logs to the run dir's train.log."""
    from trainer.log import log_to_file
    from trainer.run import train

    if int(os.environ.get("RANK", "0")) == 0:
        log_to_file(plan.run_dir)
    else:
        logging.getLogger().setLevel(logging.WARNING)
    train(plan)
    _leave_process_group()


def _leave_process_group() -> None:
    """Tear the process group down before the interpreter does, once every rank is done.

    Left to exit-time destructors, a finished ZeRO-3 rank on CPU was seen to abort ("terminate called without an
    active exception", exit -6) after it had trained and saved, which fails the whole torchrun job.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    from trainer.log import configure_logging

    configure_logging()
    if len(argv) != 1:
        print("usage: python -m trainer.rank RUN_DIR  (started by the launcher on every process)", file=sys.stderr)
        return 2
    try:
        run_rank(read_plan(argv[0]))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return INTERRUPT_EXIT_CODE  # the launcher prints the one line; a rank prints no traceback
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
