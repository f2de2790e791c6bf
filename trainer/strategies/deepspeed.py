"""zero2, zero3, zero3_offload: DeepSpeed ZeRO with a generated config written into the run dir.

ZeRO-2 shards optimizer states and gradients; ZeRO-3 also the weights (gathered per module in its forward);
zero3_offload keeps parameters and optimizer states in host memory. On CPU DeepSpeed's CPU accelerator runs on
gloo; accelerate picks no backend at all there, so the process group is started here.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

from trainer.strategies.base import Strategy, StrategySpec

CONFIG_FILE = "deepspeed.json"


class DeepSpeed(Strategy):
    stage: int = 2
    offload: bool = False

    def configure(self, spec: StrategySpec, cfg: Any, device: str, compute_dtype: str, decoder_layer: str) -> None:
        spec.deepspeed_config = self.config(cfg, compute_dtype)
        spec.training_args = {"ddp_backend": spec.dist_backend}
        if device == "cpu":
            # accelerate turns DeepSpeed off when told use_cpu; DeepSpeed's CPU accelerator runs on gloo, started
            # before TrainingArguments (prepare_process_group): keep that state.
            spec.training_args.update(use_cpu=False, accelerator_config={"use_configured_state": True})

    def config(self, cfg: Any, compute_dtype: str) -> Dict[str, Any]:
        offload = self.offload or bool(cfg.strategy.offload_params)
        zero: Dict[str, Any] = {"stage": self.stage, "overlap_comm": True, "contiguous_gradients": True,
                                "reduce_bucket_size": "auto"}
        if self.stage == 3:
            zero.update({
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                # Adapters and full weights are saved as one 16-bit file, not as ZeRO shards.
                "stage3_gather_16bit_weights_on_model_save": True,
            })
        if offload or cfg.strategy.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        return {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "train_batch_size": "auto",
            "bf16": {"enabled": compute_dtype == "bfloat16"},
            "fp16": {"enabled": compute_dtype == "float16"},
            "zero_optimization": zero,
        }

    def prepare_process_group(self, spec: StrategySpec, device: str) -> None:
        super().prepare_process_group(spec, device)
        if device != "cpu" or spec.world_size < 2:
            return
        from accelerate.state import PartialState

        previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what TrainingArguments sets around its own init
        try:
            PartialState(backend="gloo")
        finally:
            if previous is None:
                os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
            else:
                os.environ["ACCELERATE_USE_DEEPSPEED"] = previous

    def training_arguments(self, spec: StrategySpec, run_dir: str, device: str) -> Dict[str, Any]:
        """The DeepSpeed config goes into the run dir and is passed by path."""
        kwargs = dict(spec.training_args)
        # One CPU process: accelerate runs DeepSpeed only on accelerators or across ranks; train plainly.
        if spec.deepspeed_config is not None and not (device == "cpu" and spec.world_size < 2):
            path = os.path.join(run_dir, CONFIG_FILE)
            # Every rank writes the same bytes; a unique temp name and an atomic rename keep readers whole.
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(spec.deepspeed_config, f, indent=2)
            os.replace(tmp, path)
            kwargs["deepspeed"] = path
        return kwargs


def _stage(name: str, summary: str, stage: int, offload: bool = False) -> DeepSpeed:
    made = DeepSpeed(name=name, summary=summary, distributed=True, shards_weights=stage == 3,
                     allows_fused_ce=True, allows_fused_lora=stage != 3, allows_compile=False)
    made.stage, made.offload = stage, offload
    return made


STRATEGIES = [
    _stage("zero2", "DeepSpeed ZeRO-2: optimizer states and gradients sharded", 2),
    _stage("zero3", "DeepSpeed ZeRO-3: weights, gradients and optimizer states sharded", 3),
    _stage("zero3_offload", "DeepSpeed ZeRO-3 with parameters and optimizer states in host memory", 3, offload=True),
]
