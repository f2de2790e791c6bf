"""Library messages a run would print that tell the user nothing they can act on, silenced by their exact text.

Each entry names the library version that prints it and why it does not apply to a qforge run. Anything else
a library says is still shown.
"""

from __future__ import annotations

import logging
import warnings

# peft 0.21's PeftModel.__init__ reads model.is_gradient_checkpointing, which transformers >= 5.23 deprecates;
# qforge itself uses the new names (plan.checkpointing_argument).
_WARNINGS = [(FutureWarning, r"`is_gradient_checkpointing` is deprecated")]
# aqlm 1.1.7 (imported by peft whenever it is installed) compiles helpers with torch.jit.script at import, which
# torch 2.14 deprecates with a FutureWarning (2.13: a DeprecationWarning).
_WARNINGS += [(category, r"`torch\.jit\.script(_method)?` is deprecated") for category in (FutureWarning,
                                                                                             DeprecationWarning)]
# DeepSpeed 0.19.8's ZeRO collectives call torch.distributed.all_gather_into_tensor and reduce_scatter_tensor,
# which torch 2.13 deprecates: one FutureWarning per call, about 200 lines in a short ZeRO-3 run.
_WARNINGS += [(FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")]

# bitsandbytes 0.50 on AVX512-BF16 CPUs tries to load an optional inference kernel at import; qforge never
# takes that path (quant/bnb.keep_training_layout), so its absence is no news.
_LOG_MESSAGES = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward"}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence() -> None:
    """Install the filters (idempotent); call before the libraries are imported."""
    for category, pattern in _WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name, prefix in _LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))
