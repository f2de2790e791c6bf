"""How many input columns LLM.int8 treats as outliers, per linear layer: the memory the prediction leaves out.

bitsandbytes 0.50's MatMul8bitLt keeps, besides a linear's input, a second copy of the input columns that hold a
value over its outlier threshold (6.0) for backward. How many do depends on the weights and the data, not the
shape (docs/memory.md, Known limits). This prints the share of such columns:

- for the bench's random-weight 8B and 1B shapes, in the input of down_proj (the SwiGLU product of unit-RMS
  inputs through std-0.02 weights, which is how bench/workload.py initialises them), at 2048 and 8192 tokens;
- with --model DIR, for every linear of a real model on the shipped instruction data, and for the same
  architecture with random weights. The real-model tests convert SmolLM2-135M-Instruct into
  .pytest_cache/qforge-models/smollm2-135m-instruct, which is the default.

    python -m bench.int8_outliers [--model DIR] [--records 64]

CPU only, about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List

REPO = Path(__file__).resolve().parent.parent

THRESHOLD = 6.0  # bitsandbytes' default llm_int8_threshold
SAMPLE_DATA = REPO / "trainer" / "assets" / "sample_instructions.jsonl"
SHAPES = {"8b": (4096, 14336), "1b": (2048, 8192)}  # hidden, intermediate (bench/workload.py)


def random_shape_shares() -> None:
    import torch

    torch.manual_seed(0)
    for name, (hidden, inter) in SHAPES.items():
        for tokens in (2048, 8192):
            x = torch.randn(tokens, hidden)  # a post-RMSNorm input: unit RMS
            gate = x @ (torch.randn(hidden, inter) * 0.02)
            up = x @ (torch.randn(hidden, inter) * 0.02)
            product = torch.nn.functional.silu(gate) * up
            share = (product.abs() > THRESHOLD).any(0).float().mean().item()
            print(f"random {name} shape, {tokens} tokens: down_proj input std {product.std().item():.2f}, "
                  f"{100 * share:.1f}% of {inter} columns over {THRESHOLD}")


def model_shares(model_dir: Path, records: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    rows = [json.loads(line) for line in SAMPLE_DATA.read_text(encoding="utf-8").splitlines()[:records]]
    texts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")},
         {"role": "assistant", "content": r["output"]}], tokenize=False) for r in rows]
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=256)
    real = batch["attention_mask"].bool()
    print(f"{model_dir.name}: {int(real.sum())} tokens of {records} shipped records")
    for label in ("pretrained", "random weights"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if label == "random weights":
            model = AutoModelForCausalLM.from_config(model.config).float()
        shares: Dict[str, List[float]] = defaultdict(list)

        def hook(kind: str, into: Dict[str, List[float]]) -> Callable[[torch.nn.Module, tuple], None]:
            def record(module: torch.nn.Module, args: tuple) -> None:
                into[kind].append((args[0][real].abs() > THRESHOLD).any(0).float().mean().item())
            return record

        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.register_forward_pre_hook(hook(name.rsplit(".", 1)[-1], shares))
        with torch.no_grad():
            model(**batch)
        summary = ", ".join(f"{kind} {100 * sum(v) / len(v):.1f}% (worst layer {100 * max(v):.1f}%)"
                            for kind, v in shares.items())
        print(f"  {label}: input columns over {THRESHOLD}, mean over layers: {summary}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path,
                        default=REPO / ".pytest_cache" / "qforge-models" / "smollm2-135m-instruct")
    parser.add_argument("--records", type=int, default=64)
    args = parser.parse_args()
    random_shape_shares()
    if (args.model / "config.json").is_file():
        model_shares(args.model, args.records)
    else:
        print(f"no model at {args.model} (the real-model tests build it; or pass --model DIR): skipped")


if __name__ == "__main__":
    main()
