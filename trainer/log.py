"""How qforge logs: one format on stderr for every process, and rank 0's copy in the run dir's train.log."""

from __future__ import annotations

import logging
import sys


def configure_logging() -> None:
    from trainer.library_noise import silence

    silence()
    logging.basicConfig(level=logging.INFO, format="[qforge %(asctime)s] %(message)s", datefmt="%H:%M:%S", force=True,
                        stream=sys.stderr)


def log_to_file(run_dir: str) -> logging.Handler:
    handler = logging.FileHandler(f"{run_dir}/train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler
