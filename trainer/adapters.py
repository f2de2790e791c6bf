"""PEFT methods: the printable spec (plan time, torch-free) and attaching it to a loaded model (run time)."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Union

from trainer.adapters_rules import trains_adapter
from trainer.errors import UserError
from trainer.rules import peft_method
from trainer.specs import ModelSpec, PeftSpec

log = logging.getLogger(__name__)


# ---- plan time ----

def _targets(cfg: Any) -> Union[str, List[str]]:
    targets = list(cfg.peft.target_modules)
    return "all-linear" if targets == ["all-linear"] else targets


def peft_spec(cfg: Any) -> PeftSpec:
    """The peft config arguments (or the freeze/full description) as plain values."""
    name = peft_method(cfg)
    p = cfg.peft
    kwargs: Dict[str, Any]
    if name in ("lora", "dora", "pissa"):
        kwargs = {
            "r": p.r,
            "lora_alpha": p.alpha,
            "lora_dropout": p.dropout,
            "target_modules": _targets(cfg),
            "use_rslora": bool(p.use_rslora),
            "use_dora": name == "dora",
        }
        if name == "pissa":
            kwargs["init_lora_weights"] = f"pissa_niter_{p.pissa_iters}"
    elif name == "oft":
        kwargs = {
            "r": p.r if p.oft_block_size == 0 else 0,
            "oft_block_size": p.oft_block_size,
            "module_dropout": p.dropout,
            "target_modules": _targets(cfg),
        }
    elif name == "freeze":
        kwargs = {"trainable_layers": p.freeze_trainable_layers}
    else:
        kwargs = {"trainable": "all parameters"}
    if cfg.model.resize_vocab and trains_adapter(name):
        # New token rows start untrained: the embeddings and the output layer train whole beside the adapter.
        kwargs["modules_to_save"] = ["embed_tokens", "lm_head"]
    return PeftSpec(method=name, trains_adapter=trains_adapter(name), kwargs=kwargs)


# ---- run time ----

def attach(model: Any, peft: PeftSpec, model_spec: ModelSpec) -> Any:
    """Make the right parameters trainable: load or create an adapter, or unfreeze layers."""
    if peft.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if peft.method == "freeze":
        return _freeze_all_but_last(model, int(peft.kwargs["trainable_layers"]))

    from peft import LoraConfig, OFTConfig, PeftModel, TaskType, get_peft_model

    adapters = list(model_spec.adapters)
    if adapters and not model_spec.new_adapter:
        # Continue training the (single) loaded adapter; earlier ones are merged into the base.
        for path in adapters[:-1]:
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
        return PeftModel.from_pretrained(model, adapters[-1], is_trainable=True)
    for path in adapters:
        model = PeftModel.from_pretrained(model, path).merge_and_unload()

    kwargs = dict(peft.kwargs)
    from trainer.quant.targets import linear_targets

    if kwargs.get("target_modules") == "all-linear" and linear_targets(model):
        # HQQ / GPTQ / AWQ / AQLM layers are not nn.Linear, which is all peft's "all-linear" matches.
        kwargs["target_modules"] = linear_targets(model)
    config = (OFTConfig if peft.method == "oft" else LoraConfig)(task_type=TaskType.CAUSAL_LM, **kwargs)
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        if "Target module" not in str(err) and "target_modules" not in str(err):
            raise
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and not list(m.children())})
        raise UserError(f"peft.target_modules={kwargs.get('target_modules')} names no layer of this model; use "
                        f"all-linear or some of: {', '.join(names[:24])}.") from None


def _freeze_all_but_last(model: Any, n_layers: int) -> Any:
    layers = model.get_decoder().layers
    keep = {id(p) for layer in list(layers)[-n_layers:] for p in layer.parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)
    log.info("freeze: training the last %d of %d decoder layers", min(n_layers, len(layers)), len(layers))
    return model
