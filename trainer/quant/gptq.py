"""GPTQ: pre-quantized checkpoints (gptqmodel through transformers), and the export that makes them.

transformers 5.x loads GPTQ (and AWQ) through gptqmodel and optimum. gptqmodel picks its kernel per
device; qforge names a kernel with a backward pass explicitly (`trainable_kernel`).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List

from trainer.quant.base import Backend, Requirement
from trainer.quant.prequantized import check_checkpoint, load_prequantized, sharding_rule
from trainer.quant.targets import mark_linear_targets

# gptqmodel ships as an sdist only; its kernels compile on first use, so it installs on CPU too.
INSTALL = "pip install 'qforge[gptq]'  (gptqmodel>=2.0 and optimum>=1.24)"

RULES = [sharding_rule("gptq", "GPTQ")]

GPTQMODEL = Requirement("gptqmodel", "gptqmodel", "2.0.0", INSTALL)
# transformers' own floor for the optimum that drives gptqmodel (quantizer_gptq.MIN_OPTIMUM_VERSION).
OPTIMUM = Requirement("optimum", "optimum", "1.24.0", INSTALL)


def requirements(cfg: Any) -> List[Requirement]:
    return [GPTQMODEL, OPTIMUM]


def export_requirements() -> List[Requirement]:
    return [GPTQMODEL, OPTIMUM]


def gptqmodel_cpu_workers() -> None:
    """gptqmodel asks for 2 CPU loader workers but budgets only ceil(cores / 2) CPU workers, so on a
    2-core machine it refuses to start; give it 2 unless the user chose a number."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 1) + 1) // 2)))


def trainable_kernel(method: str, device: str) -> str:
    """The gptqmodel backend to load with: named explicitly on CPU, where gptqmodel's own choice depends on the CPU.

    gptqmodel 7.7 ranks an AVX512-BF16 kernel (TorchCpuAvx512Linear / TorchCpuAvx512AwqLinear) first on CPUs
    that have the instruction; both are inference only (the AWQ one raises in .train(), and plain `auto`, which
    AWQ loading used, picks it). On CPU qforge names kernels with a backward pass that run on every x86 CPU:
    GPTQ's ATen int4pack kernel (TorchAtenLinear), and for AWQ gptqmodel's pure-torch AwqTorchLinear
    (`torch_awq`: transformers 5.17's AwqConfig accepts no name for the AWQ ATen kernel). On a GPU,
    `auto_trainable` keeps gptqmodel to kernels with a backward pass (exllama and marlin are inference only).
    """
    if device == "cpu":
        return {"gptq": "gptq_torch_aten", "awq": "torch_awq"}[method]
    return "auto_trainable"


def load_kwargs(cfg: Any, device: str, compute_dtype: str) -> Dict[str, Any]:
    return {"backend": trainable_kernel("gptq", device)}


def load(path: str, spec: Any, model_kwargs: Dict[str, Any]) -> Any:
    check_checkpoint(path, "gptq", spec.bits)
    gptqmodel_cpu_workers()
    model = load_prequantized(path, model_kwargs, **spec.load_kwargs)
    return mark_linear_targets(model)  # gptqmodel's layers are not nn.Linear


BACKEND = Backend(
    method="gptq",
    label="GPTQ",
    summary="GPTQ 2/3/4/8-bit, pre-quantized checkpoint (gptqmodel)",
    bits=(2, 3, 4, 8),
    pre_quantized=True,
    trains_quantized=True,
    rules=RULES,
    requirements=requirements,
    loader="trainer.quant.gptq:load",
    load_kwargs=load_kwargs,
)
