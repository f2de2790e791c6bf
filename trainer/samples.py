"""eval.samples=N: generations a person reads, for N held-out prompts, before and after training (samples.md).

A prompt is a held-out example's tokens up to its first trained token: the conversation as the run's chat
template rendered it, ending with the assistant header, so the model is asked exactly the way it was trained
and will be served. The reference is that first assistant turn. Generation is greedy, stops at the template's
end-of-turn token or eos, and runs on rank 0 with the unwrapped model (single and ddp; the rule
eval.samples_sharded refuses it where no rank holds the whole model).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
BEFORE_FILE = "samples_before.json"
SAMPLES_FILE = "samples.md"
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def prompts(rows: Sequence[Dict[str, List[int]]], count: int) -> List[Tuple[List[int], List[int]]]:
    """(prompt ids, reference ids) of the first `count` rows that have a prompt and a trained answer."""
    found = []
    for row in rows:
        labels = row["labels"]
        start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
        if not start:  # no trained token, or one at position 0 (nothing to prompt with)
            continue
        end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
        found.append((list(row["input_ids"][:start]), list(row["input_ids"][start:end])))
        if len(found) == count:
            break
    return found


def stop_ids(tokenizer: Any) -> List[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for token in END_OF_TURN:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


def generate(model: Any, tokenizer: Any, cases: Sequence[Tuple[List[int], List[int]]], max_new_tokens: int,
             device: Any) -> List[str]:
    import torch

    was_training = model.training
    model.eval()
    outputs = []
    try:
        with torch.no_grad():
            for prompt, _ in cases:
                ids = torch.tensor([prompt], device=device)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=stop_ids(tokenizer),
                                     pad_token_id=tokenizer.pad_token_id, use_cache=True)
                outputs.append(tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return outputs


def render(tokenizer: Any, cases: Sequence[Tuple[List[int], List[int]]], before: Optional[List[str]],
           after: List[str], title: str) -> str:
    lines = [f"# Samples: {title}", "",
             f"{len(cases)} held-out prompts, greedy decoding, rendered with the run's chat template.", ""]
    for number, (prompt, reference) in enumerate(cases, start=1):
        lines += [f"## Sample {number}", "", "**Prompt** (as the model saw it):", "", "```",
                  tokenizer.decode(prompt, skip_special_tokens=False).strip(), "```", "",
                  "**Reference:**", "", tokenizer.decode(reference, skip_special_tokens=True).strip(), ""]
        if before is not None:
            lines += ["**Before training:**", "", before[number - 1] or "(nothing)", ""]
        lines += ["**After training:**", "", after[number - 1] or "(nothing)", ""]
    return "\n".join(lines)


def samples_callback(plan: Any, eval_rows: Any, tokenizer: Any) -> Any:
    """Generates before the first step (unless a resumed attempt already did) and after the last one."""
    from transformers import TrainerCallback

    count, max_new = plan.run.eval_samples, plan.run.eval_max_new_tokens
    cases = prompts(eval_rows, count) if eval_rows is not None else []
    before_file = Path(plan.run_dir) / BEFORE_FILE

    class Samples(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if state.is_world_process_zero and cases and not before_file.exists():
                before_file.write_text(json.dumps(generate(model, tokenizer, cases, max_new, args.device)))

        def write_after(self, model: Any, device: Any) -> Optional[Path]:
            if not cases:
                log.info("eval.samples: no held-out example has a prompt and an answer to sample")
                return None
            before = json.loads(before_file.read_text()) if before_file.exists() else None
            after = generate(model, tokenizer, cases, max_new, device)
            path = Path(plan.run_dir) / SAMPLES_FILE
            path.write_text(render(tokenizer, cases, before, after, plan.run_name))
            return path

    return Samples()
