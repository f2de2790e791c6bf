"""Apply HQQ with the hqq library to a model loaded in its compute dtype.

transformers 5.x raises NotImplementedError for HqqConfig in from_pretrained, so the model loads
unquantized (on CPU, to keep the GPU peak at the quantized size) and every nn.Linear inside the
decoder layers is replaced, one at a time, by an HQQLinear on the target device. The embeddings and
lm_head stay in the compute dtype, as bitsandbytes leaves them. peft wraps HQQLinear through its
own hqq dispatch, so LoRA and DoRA train on top unchanged.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List

from trainer.quant.targets import mark_linear_targets

log = logging.getLogger(__name__)


def quant_config(bits: int, group_size: int, axis: int = 1) -> Dict[str, Any]:
    from hqq.core.quantize import BaseQuantizeConfig

    return BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=axis)


def _device(model_kwargs: Dict[str, Any]) -> str:
    device_map = model_kwargs.get("device_map")
    if isinstance(device_map, dict) and "" in device_map:
        target = device_map[""]
        return f"cuda:{target}" if isinstance(target, int) else str(target)
    return "cpu"


def quantize_model(model: Any, bits: int, group_size: int, compute_dtype: Any, device: str) -> List[str]:
    """Replace the decoder's nn.Linear layers by HQQLinear in place; return their leaf names."""
    import torch
    from hqq.core.quantize import HQQBackend, HQQLinear

    # The pure-torch backend dequantizes in the forward pass, so autograd reaches the inputs (and
    # so the adapters) on CPU and GPU alike; the fused kernels are inference only.
    HQQLinear.set_backend(HQQBackend.PYTORCH)
    config = quant_config(bits, group_size)
    names = set()
    decoder = model.get_decoder()
    for _, parent in list(decoder.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            quantized = HQQLinear(child, config, del_orig=True, compute_dtype=compute_dtype, device=device)
            setattr(parent, child_name, quantized)
            names.add(child_name)
    for module in model.modules():
        # What HQQ did not replace (embeddings, norms, lm_head) goes where the quantized layers are.
        for key, param in module.named_parameters(recurse=False):
            if param.device != torch.device(device):
                setattr(module, key, torch.nn.Parameter(param.data.to(device), requires_grad=param.requires_grad))
        for key, buf in module.named_buffers(recurse=False):
            if buf.device != torch.device(device):
                module._buffers[key] = buf.to(device)
    return sorted(names)


def load_and_quantize(path: str, bits: int, group_size: int, model_kwargs: Dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    device = _device(model_kwargs)
    load_kwargs = {k: v for k, v in model_kwargs.items() if k != "device_map"}
    model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
    names = quantize_model(model, bits, group_size, model_kwargs["dtype"], device)
    mark_linear_targets(model)  # HQQLinear is not an nn.Linear, so peft's "all-linear" misses it
    log.info("hqq: %d-bit, group size %d, on %s; quantized layers: %s",
             bits, group_size, device, ", ".join(names))
    return model
