"""Environment facts checked before loading anything heavy: packages, versions, GPUs.

Kept apart from the validator so a composition can be validated on a login node that has none of
the backends installed and no GPU.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from typing import Any, Dict, List, Tuple

from packaging.version import Version

from trainer.env import accelerators
from trainer.errors import UserError
from trainer.quant import Requirement, backend_for
from trainer.rules import method, strategy

DEEPSPEED = Requirement("deepspeed", "deepspeed", "0.14.0", "pip install 'qforge[deepspeed]'")
WANDB = Requirement("wandb", "wandb", "0.16.0", "pip install 'qforge[wandb]'")
# transformers builds these optimizers from bitsandbytes (8-bit and paged states, Lion, AdEMAMix).
BNB_OPTIMIZER = Requirement("bitsandbytes", "bitsandbytes", "0.44.0", "pip install 'qforge[bnb]'")
BNB_OPTIMIZERS = ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "lion_32bit",
                  "paged_lion_8bit", "paged_lion_32bit", "ademamix", "ademamix_8bit")


def requirements(cfg: Any) -> List[Tuple[str, Requirement]]:
    """(what asks for it, requirement) pairs for this composition."""
    needed = [(f"quant={method(cfg)}", r) for r in backend_for(method(cfg)).requirements(cfg)]
    if strategy(cfg).startswith("zero"):
        needed.append((f"strategy={strategy(cfg)}", DEEPSPEED))
    if cfg.logger.name.value == "wandb":
        needed.append(("logger=wandb", WANDB))
    if cfg.train.optim.value in BNB_OPTIMIZERS:
        needed.append((f"train.optim={cfg.train.optim.value}", BNB_OPTIMIZER))
    return needed


def check(plan: Any) -> None:
    """In a rank: raise a UserError naming the first missing piece and the line that installs it."""
    check_requirements([(r.asked_by, Requirement(r.module, r.distribution, r.minimum, r.install, r.needs_gpu))
                        for r in plan.requirements])


def check_requirements(needed: List[Tuple[str, Requirement]]) -> None:
    """The same checks for any (asked by, requirement) list; trainer.export uses it too."""
    gpus = accelerators().gpus if any(req.needs_gpu for _, req in needed) else 0
    for asked_by, req in needed:
        if importlib.util.find_spec(req.module) is None:
            raise UserError(f"{asked_by} needs the package {req.distribution}, which is not installed; "
                            f"install it with: {req.install}")
        if req.minimum:
            installed = Version(importlib.metadata.version(req.distribution))
            if installed < Version(req.minimum):
                raise UserError(f"{req.distribution} {installed} is installed but this run needs "
                                f">= {req.minimum}; upgrade with: {req.install}")
        if req.needs_gpu and gpus == 0:
            raise UserError(f"{asked_by} runs only on an NVIDIA GPU ({req.distribution} has no CPU "
                            "kernels) and none is visible here; run this config on a GPU machine.")


# What every run loads, whatever its composition.
CORE_DISTRIBUTIONS = ("torch", "transformers", "peft", "accelerate")


def package_versions(cfg: Any) -> Dict[str, str]:
    """Installed versions of what this composition runs on: qforge, the core stack, and what the backend,
    strategy and logger need (bitsandbytes, deepspeed, ...), so a result can be reproduced."""
    names = ["qforge", *CORE_DISTRIBUTIONS, *(req.distribution for _, req in requirements(cfg))]
    versions = {"python": platform.python_version()}
    for name in dict.fromkeys(names):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def machine_facts() -> Dict[str, str]:
    """The CPU's model, the instruction set torch's CPU kernels use (they change CPU numerics), and the GPU and
    CUDA version when there is one. Imports torch: called by a rank, not at plan time."""
    import torch

    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    facts = {"cpu": model, "torch_cpu_capability": str(torch.backends.cpu.get_cpu_capability())}
    if torch.cuda.is_available():
        facts.update(gpu=torch.cuda.get_device_name(0), cuda=str(torch.version.cuda))
    return facts
