"""Measure every quantization backend on one GPU: the README backend table (docs/backends.md).

    source tests/gpu/install_on_device.sh && CUDA_VISIBLE_DEVICES=0 python tests/gpu/backends_gpu.py --out $OUT

Builds a Llama-shaped model with random weights (1.1B parameters by default, TinyLlama's shape),
then for each backend loads it through qforge's own loader (trainer.model.load_for_training: the
backend, norms upcast, checkpointing, the LoRA adapter), and measures
  load_s        wall time of that load (for HQQ this includes quantizing after loading)
  peak_gib      torch.cuda.max_memory_allocated over the load and the training steps
  tokens_per_s  LoRA training throughput after warm-up (AdamW, bf16, gradient checkpointing)
  rel_err       ||W_q - W||_F / ||W||_F over the decoder's linear weights of the first and last
                layer, W_q dequantized from what the backend holds, W the bf16 original
Writes backends.json and backends.md (a markdown table) to --out. Runs on CPU with a small shape
(--small) so the script itself is tested before it spends GPU time.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

BACKENDS: Dict[str, List[str]] = {
    "bf16 LoRA (reference)": ["quant=none"],
    "bnb4 (NF4, double quant)": ["quant=bnb4"],
    "bnb8 (LLM.int8)": ["quant=bnb8"],
    "hqq 4-bit (g64)": ["quant=hqq", "quant.bits=4"],
    "hqq 2-bit (g64)": ["quant=hqq", "quant.bits=2"],
    "fp8 checkpoint (dequantized on load)": ["quant=fp8"],
    "aqlm 2-bit (4x4 codebooks, g8)": ["quant=aqlm", "quant.bits=2"],
}


def build_model(root: Path, shape: Dict[str, int]) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trainer.tiny import TOKENIZER_DIR

    target = root / "llama-random"
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = LlamaConfig(vocab_size=max(shape["vocab"], len(tokenizer)), hidden_size=shape["hidden"],
                         intermediate_size=shape["inter"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv"],
                         max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    params = sum(p.numel() for p in model.parameters())
    del model
    return target, params


def prequantized_copy(method: str, source: Path, root: Path) -> Path:
    """FP8 / AQLM copies of the random model, quantized here (on the GPU when there is one)."""
    from tests.quant import checkpoints

    target = root / f"llama-random-{method}"
    if method == "fp8":
        return checkpoints.write_fp8_checkpoint(source, target, block=(128, 128))
    return checkpoints.write_aqlm_checkpoint(source, target, num_codebooks=4, nbits=4, in_group=8,
                                             device="cuda" if torch.cuda.is_available() else "cpu")


def reference_weights(source: Path, layers: List[int]) -> Dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(source / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if key.endswith("_proj.weight") and any(key.startswith(f"model.layers.{i}.") for i in layers):
                out[key[: -len(".weight")]] = f.get_tensor(key)
    return out


def dequantized(module: Any) -> Optional[torch.Tensor]:
    """The weight a quantized layer computes with, as a float tensor (None if unknown)."""
    name = type(module).__name__
    if name == "HQQLinear":
        return module.dequantize()
    if name == "Linear4bit":
        import bitsandbytes.functional as F

        return F.dequantize_4bit(module.weight.data, module.weight.quant_state)
    if name == "Linear8bitLt":
        weight = module.weight
        if getattr(weight, "CB", None) is not None:
            return weight.CB.float() * weight.SCB.float()[:, None] / 127.0
        return None
    if name == "QuantizedLinear":  # aqlm
        from aqlm.utils import _dequantize_weight, unpack_int_data

        codes = module.codes
        if codes.shape[0] != module.out_features // module.out_group_size:  # aqlm's CPU permutation
            codes = codes.permute(1, 0, 2)
        return _dequantize_weight(unpack_int_data(codes, module.nbits_per_codebook), module.codebooks,
                                  module.scales)
    if isinstance(module, torch.nn.Linear):
        return module.weight
    return None


def reconstruction_error(model: Any, reference: Dict[str, torch.Tensor]) -> Optional[float]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = dict(base.named_modules())
    num = den = 0.0
    for name, ref in reference.items():
        module = modules[name]
        module = getattr(module, "base_layer", module)  # the layer under the LoRA wrapper
        weight = dequantized(module)
        if weight is None:
            return None
        ref = ref.to(weight.device, torch.float32)
        num += (weight.float().reshape(ref.shape) - ref).pow(2).sum().item()
        den += ref.pow(2).sum().item()
    return math.sqrt(num / den)


def measure(label: str, overrides: List[str], source: Path, reference: Dict[str, torch.Tensor],
            args: argparse.Namespace, run_root: Path) -> Dict[str, Any]:
    from trainer.compose import compose
    from trainer.model import load_for_training
    from trainer.plan import build_plan

    cfg = compose([*overrides, "model=local", f"model.name_or_path={source}", "launcher=local",
                   f"output_root={run_root}"])
    plan = build_plan(cfg)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    started = time.perf_counter()
    model, _ = load_for_training(plan)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - started
    weights_gib = torch.cuda.memory_allocated() / 2**30 if cuda else None
    rel_err = reconstruction_error(model, reference)

    device = next(p for p in model.parameters() if p.requires_grad).device
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    vocab = min(1000, model.config.vocab_size)
    batch = torch.randint(3, vocab, (args.batch, args.seq), generator=generator).to(device)
    dtype = getattr(torch, plan.compute_dtype)
    losses = []

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    row = {
        "backend": label,
        "overrides": " ".join(overrides),
        "load_s": round(load_s, 1),
        "weights_gib": round(weights_gib, 2) if weights_gib is not None else None,
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "tokens_per_s": round(args.batch * args.seq * args.steps / seconds),
        "rel_err": round(rel_err, 4) if rel_err is not None else None,
        "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)],
        "finite": all(math.isfinite(x) for x in losses),
    }
    model = optimizer = None  # free before the next backend loads
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def table(rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    lines = [f"Measured on {meta['device']}, {meta['params'] / 1e9:.2f}B-parameter Llama-shaped model "
             f"(random weights), LoRA r=16 on all linear layers, batch {meta['batch']} x {meta['seq']} tokens, "
             f"gradient checkpointing, {meta['steps']} timed steps after {meta['warmup']} warm-up.", "",
             "| backend | load s | weights GiB | peak GiB | tokens/s | rel. error vs bf16 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | failed: {r['error']} | | | | |")
            continue
        err = "n/a" if r["rel_err"] is None else f"{r['rel_err']:.4f}"
        lines.append(f"| {r['backend']} | {r['load_s']} | {r['weights_gib']} | {r['peak_gib']} | "
                     f"{r['tokens_per_s']} | {err} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/qforge-backends"))
    parser.add_argument("--small", action="store_true", help="a small shape, to test this script on CPU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--only", default="", help="comma-separated substrings of backend labels")
    args = parser.parse_args()
    shape = dict(vocab=32000, hidden=2048, inter=5632, layers=22, heads=32, kv=4)
    if args.small:
        shape = dict(vocab=512, hidden=128, inter=256, layers=2, heads=4, kv=2)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    source, params = build_model(args.work, shape)
    print(f"built {params / 1e9:.3f}B model in {time.perf_counter() - t0:.1f}s", flush=True)
    reference = reference_weights(source, [0, shape["layers"] - 1])
    sources: Dict[str, Callable[[], Path]] = {"fp8": lambda: prequantized_copy("fp8", source, args.work),
                                              "aqlm": lambda: prequantized_copy("aqlm", source, args.work)}
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    meta = dict(device=device, params=params, batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup)
    rows: List[Dict[str, Any]] = []
    for label, overrides in BACKENDS.items():
        if args.only and not any(s in label for s in args.only.split(",")):
            continue
        method = overrides[0].split("=")[1]
        try:
            t1 = time.perf_counter()
            path = sources[method]() if method in sources else source
            made = time.perf_counter() - t1
            row = measure(label, overrides, path, reference, args, args.work / "runs")
            if method in sources:
                row["checkpoint_made_s"] = round(made, 1)
        except Exception as err:  # one backend failing must not cost the other rows
            traceback.print_exc()
            row = {"backend": label, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
        (args.out / "backends.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (args.out / "backends.md").write_text(table(rows, meta))
    print(table(rows, meta))


if __name__ == "__main__":
    main()
