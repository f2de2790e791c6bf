"""bnb4 QLoRA on a >=1B Llama-shaped model (random weights) under single, ddp, fsdp and zero3 with NCCL.

On the GPU machine, in one call (2 GPUs):
    source tests/gpu/install_on_device.sh && python tests/gpu/strategies_gpu.py --out $OUT
Builds the model into /tmp, runs each strategy through `python train.py` exactly as a user would
(launcher=torchrun for the multi-GPU ones), and prints a markdown table of tokens/s, peak memory per
GPU and the per-GPU memory after the strategy wrapped the model (FSDP/ZeRO-3 shards the 4-bit weights).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GIB = 1024**3
STRATEGIES = ("single", "ddp", "fsdp", "zero3")


def build_model(target: Path) -> int:
    """A Llama of ~1.1B parameters with random weights and the repo's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=18, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(REPO / "trainer" / "assets" / "tokenizer").save_pretrained(target)
    del model
    torch.cuda.empty_cache()
    return params


def run(strategy: str, model_dir: Path, out: Path, steps: int, seq: int, batch: int) -> dict:
    run_dir = out / f"run-{strategy}"
    overrides = [f"strategy={strategy}", "quant=bnb4", "peft=lora", "model=local", f"model.name_or_path={model_dir}",
                 f"train.max_steps={steps}", f"train.max_seq_len={seq}", f"train.batch_size={batch}",
                 "train.save_steps=100000", "train.logging_steps=5", "do_eval=false", "data.eval_fraction=0",
                 "logger=none", f"run_dir={run_dir}"]
    env = dict(os.environ)
    if strategy == "single":
        env["CUDA_VISIBLE_DEVICES"] = "0"
    else:
        overrides += ["launcher=torchrun", "launcher.nproc_per_node=2"]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=420)
    (out / f"{strategy}.log").write_text(proc.stdout + proc.stderr)
    row = {"strategy": strategy, "rc": proc.returncode, "wall_s": round(time.monotonic() - started, 1)}
    metrics_path = run_dir / "metrics.json"
    if proc.returncode == 0 and metrics_path.exists():
        m = json.loads(metrics_path.read_text())
        row.update({
            "tokens_per_s": round(m["tokens_per_second"], 1),
            "peak_gib": round(m["peak_memory_bytes"] / GIB, 2),
            "weights_gib": round(m.get("weights_memory_bytes", 0) / GIB, 3),
            "train_loss": round(m["train_loss"], 4),
            "steps": m["steps"],
            "adapter": (run_dir / "adapter" / "adapter_model.safetensors").exists(),
        })
    else:
        row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    print(json.dumps(row), flush=True)
    return row


def table(rows: list, params: int, device: str) -> str:
    lines = [f"Model: Llama-shaped, {params / 1e9:.2f}B params, random weights, bnb4 NF4 + LoRA r16 (all-linear); "
             f"{device}.", "",
             "| strategy | GPUs | tokens/s (all GPUs) | peak GiB per GPU | weights GiB/GPU after wrap | train loss |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("rc") != 0:
            lines.append(f"| {r['strategy']} | - | failed (rc {r['rc']}) | - | - | - |")
            continue
        gpus = 1 if r["strategy"] == "single" else 2
        lines.append(f"| {r['strategy']} | {gpus} | {r['tokens_per_s']} | {r['peak_gib']} | {r['weights_gib']} "
                     f"| {r['train_loss']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/qforge-gpu"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--only", default=",".join(STRATEGIES))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    device = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    model_dir = Path("/tmp/llama-1b-random")
    params = build_model(model_dir)
    print(f"model: {params:,} params in {model_dir}; {device}", flush=True)
    rows = [run(s, model_dir, out, args.steps, args.seq, args.batch) for s in args.only.split(",")]
    text = table(rows, params, device)
    (out / "strategies_gpu.md").write_text(text)
    (out / "rows.json").write_text(json.dumps(rows, indent=2))
    print(text)


if __name__ == "__main__":
    main()
