"""single: one process, one device."""

from trainer.strategies.base import Strategy

STRATEGY = Strategy(name="single", summary="one process on one GPU (or the CPU)")
