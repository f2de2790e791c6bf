"""Small quantized checkpoints the backend tests need, made here from the tiny model (no download).

FP8: block-wise e4m3 weights with `weight_scale_inv`, the layout of DeepSeek-V3 / Qwen3-FP8 releases
that transformers' FineGrainedFP8 loader reads. Written by hand, since transformers only quantizes to
FP8 on a GPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Tuple

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_block_quantize(weight: torch.Tensor, block: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, per-block scale_inv) such that weight ~= fp8 * scale_inv, block by block."""
    out_f, in_f = weight.shape
    bo, bi = block
    rows, cols = -(-out_f // bo), -(-in_f // bi)
    padded = torch.zeros(rows * bo, cols * bi, dtype=torch.float32)
    padded[:out_f, :in_f] = weight.float()
    blocks = padded.reshape(rows, bo, cols, bi)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / FP8_MAX
    quantized = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantized.reshape(rows * bo, cols * bi)[:out_f, :in_f].contiguous(), scale_inv


def _copy_all_but_weights(source: Path, target: Path) -> Dict[str, torch.Tensor]:
    """Copy config and tokenizer files of a 16-bit checkpoint; return its tensors to quantize."""
    from safetensors.torch import load_file

    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "model.safetensors" and item.is_file():
            shutil.copy(item, target / item.name)
    return load_file(str(source / "model.safetensors"))


def write_fp8_checkpoint(source: Path, target: Path, block: Tuple[int, int] = (64, 64)) -> Path:
    """Copy a 16/32-bit checkpoint to `target` with every decoder linear weight in block FP8."""
    from safetensors.torch import save_file

    tensors = _copy_all_but_weights(source, target)
    out = {}
    for name, tensor in tensors.items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            out[name], out[name.replace(".weight", ".weight_scale_inv")] = fp8_block_quantize(tensor, block)
        else:
            out[name] = tensor
    save_file(out, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "fmt": "e4m3", "weight_block_size": list(block)}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def _kmeans(vectors: torch.Tensor, k: int, iters: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(vectors), generator=generator)[:k].to(vectors.device)
    centroids = vectors[pick].clone()
    for _ in range(iters):
        codes = torch.cdist(vectors, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, codes, vectors)
        counts = torch.bincount(codes, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return torch.cdist(vectors, centroids).argmin(dim=1), centroids


def aqlm_quantize(weight: torch.Tensor, num_codebooks: int, nbits: int, in_group: int,
                  iters: int = 8, device: str = "cpu") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual k-means additive quantization in AQLM's layout (out_group_size 1): codes, codebooks, scales.

    Not AQLM's beam search, but the same representation: each group of `in_group` weights of a row
    is the sum of one entry of each codebook, times the row's scale.
    """
    from aqlm.utils import pack_int_data

    out_f, in_f = weight.shape
    w = weight.to(device, torch.float32)
    scales = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)
    residual = (w / scales).reshape(-1, in_group)
    codes, books = [], []
    for c in range(num_codebooks):
        code, book = _kmeans(residual, 2**nbits, iters, seed=c)
        residual = residual - book[code]
        codes.append(code)
        books.append(book)
    codes_t = torch.stack(codes, dim=1).reshape(out_f, in_f // in_group, num_codebooks)
    codebooks = torch.stack(books).reshape(num_codebooks, 2**nbits, 1, in_group)
    return pack_int_data(codes_t.cpu(), nbits), codebooks.cpu(), scales.reshape(out_f, 1, 1, 1).cpu()


def write_aqlm_checkpoint(source: Path, target: Path, num_codebooks: int = 4, nbits: int = 4,
                          in_group: int = 8, device: str = "cpu") -> Path:
    """The tiny model as an AQLM checkpoint: num_codebooks * nbits / in_group bits per weight (2 by default).

    Codebooks of 2**nbits != 256 entries keep aqlm on its pure-torch kernel on CPU (256 would need numba).
    """
    from safetensors.torch import save_file

    tensors = _copy_all_but_weights(source, target)
    out = {}
    for name, tensor in tensors.items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            prefix = name[: -len(".weight")]
            codes, books, scales = aqlm_quantize(tensor, num_codebooks, nbits, in_group, device=device)
            out[f"{prefix}.codes"] = codes
            out[f"{prefix}.codebooks"] = books.to(tensor.dtype)
            out[f"{prefix}.scales"] = scales.to(tensor.dtype)
        else:
            out[name] = tensor
    save_file(out, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "aqlm", "in_group_size": in_group, "out_group_size": 1,
                                     "num_codebooks": num_codebooks, "nbits_per_codebook": nbits,
                                     "linear_weights_not_to_quantize": ["lm_head"]}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def write_awq_checkpoint(source: Path, target: Path, group_size: int = 32) -> Path:
    """AWQ 4-bit (GEMM layout) with gptqmodel's own quantizer, calibrated on the shipped sample data."""
    import os

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT, METHOD
    from transformers import AutoTokenizer

    from trainer.compose import ASSETS

    records = [json.loads(line) for line in (ASSETS / "sample_instructions.jsonl").read_text().splitlines()[:32]]
    texts = [f"{r['instruction']}\n{r['output']}" for r in records]
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = GPTQModel.load(str(source), QuantizeConfig(bits=4, group_size=group_size, quant_method=METHOD.AWQ,
                                                        format=FORMAT.GEMM), device="cpu")
    model.quantize(texts, tokenizer=tokenizer, calibration_data_min_length=4)
    model.save(str(target))
    return target


FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def mxfp4_quantize(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """OCP MXFP4 of `weight` [..., K]: e2m1 values packed two per byte in groups of 32 along K, and
    one e8m0 exponent (biased by 127) per group, in the blocks/scales layout of gpt-oss checkpoints."""
    *prefix, k = weight.shape
    groups = weight.float().reshape(*prefix, k // 32, 32)
    amax = groups.abs().amax(dim=-1, keepdim=True).clamp(min=2.0**-126)
    exponent = torch.ceil(torch.log2(amax / 6.0))  # so the group's largest value fits under 6
    scaled = groups / torch.exp2(exponent)
    index = (scaled.abs().unsqueeze(-1) - FP4_GRID).abs().argmin(dim=-1)
    index = torch.where(scaled < 0, index + 8, index).to(torch.uint8)
    blocks = index[..., 0::2] | (index[..., 1::2] << 4)
    return blocks, (exponent.squeeze(-1) + 127).to(torch.uint8)


def write_mxfp4_checkpoint(target: Path, layers: int = 2, experts: int = 4, seed: int = 0) -> Tuple[Path, Path]:
    """A tiny gpt-oss (MoE) model with random weights: the bf16 original and its MXFP4 copy
    (experts in MXFP4, as gpt-oss ships them; transformers' MXFP4 covers only these experts)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, GptOssConfig, GptOssForCausalLM

    from trainer.tiny import TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = GptOssConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=experts,
                          num_experts_per_tok=2, max_position_embeddings=1024, sliding_window=64,
                          layer_types=["sliding_attention", "full_attention"] * (layers // 2),
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = GptOssForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():  # experts start at zero in __init__; give them real random weights
        for name, param in model.named_parameters():
            if ".experts." in name and "bias" not in name:
                param.normal_(0, 0.02)
    source, quantized = target / "bf16", target / "mxfp4"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    quantized.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "model.safetensors" and item.is_file():
            shutil.copy(item, quantized / item.name)
    out = {}
    for name, tensor in load_file(str(source / "model.safetensors")).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            # Stored transposed: [experts, out, in] with groups along `in`.
            out[f"{name}_blocks"], out[f"{name}_scales"] = mxfp4_quantize(tensor.transpose(1, 2).contiguous())
        else:
            out[name] = tensor
    save_file(out, str(quantized / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (quantized / "config.json").write_text(json.dumps(cfg, indent=2))
    return source, quantized
