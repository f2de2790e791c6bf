"""unsloth as the bench's third side (run by bench/side.py in its own process; GPU only).

Trained the way unsloth's docs show: FastLanguageModel.from_pretrained(load_in_4bit=True) (its own nf4 +
double quant config, bf16 compute), FastLanguageModel.get_peft_model with its recommended lora_dropout=0 and
use_gradient_checkpointing="unsloth" (checkpointed layer inputs offloaded to host memory), and TRL's
SFTTrainer, with packing=True for the variable-length items. What stays equal to the other sides: the
checkpoint, the tokenized examples (qforge's own tokenization, so token counts match), LoRA r=16 alpha=32 on
every linear layer, batch, sequence length, optimizer, learning rate, schedule, and the meter.

The unsloth packages travel separately from the others (`.whl-unsloth`, tests/gpu/fetch_unsloth_wheels.sh) and
are put on this process's path only, so the baseline and qforge sides never import them.
"""

from __future__ import annotations

import os
import tempfile
from importlib.metadata import version
from typing import Any, Dict, List

# unsloth's default targets are every linear layer of a Llama decoder, the same set as peft's "all-linear".
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OPTIMIZER = "adamw_torch"  # the other sides' optimizer, so the comparison is of the frameworks, not of Adam states


def settings(item: Dict[str, Any]) -> Dict[str, Any]:
    """What this side ran with, written next to its numbers in the results."""
    return {
        "load": "FastLanguageModel.from_pretrained(load_in_4bit=True, dtype=bfloat16)",
        "peft": "get_peft_model(r=16, lora_alpha=32, lora_dropout=0, all linear layers, bias='none', "
                "use_gradient_checkpointing='unsloth')",
        "trainer": f"trl.SFTTrainer(packing={item['kind'] == 'variable'}), optim={OPTIMIZER}, lr 2e-4 linear, "
                   "no warm-up, gradient_accumulation_steps=1",
    }


def _import_unsloth() -> Any:
    """unsloth must be imported before transformers, peft and trl: it patches them when imported."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench: the unsloth side needs a CUDA GPU (unsloth does not train on CPU); "
                         "leave it out of --sides here")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    try:
        import unsloth  # noqa: F401
        from unsloth import FastLanguageModel
    except ImportError as err:
        raise SystemExit(f"bench: unsloth is not importable ({err}); carry .whl-unsloth "
                         "(bash tests/gpu/fetch_unsloth_wheels.sh) or leave the side out of --sides") from err
    return FastLanguageModel


def run_unsloth(job: Dict[str, Any]) -> List[Dict[str, Any]]:
    fast_model = _import_unsloth()
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq
    from trl import SFTConfig, SFTTrainer

    from bench.side import Meter, examples_for, free_memory, fresh_adapter, losses_of, probe_loss

    max_len = max(item["max_len"] for item in job["items"])
    model, tokenizer = fast_model.from_pretrained(model_name=job["checkpoint"], max_seq_length=max_len,
                                                  dtype=torch.bfloat16, load_in_4bit=True)
    model = fast_model.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, target_modules=TARGET_MODULES,
                                      bias="none", use_gradient_checkpointing="unsloth", random_state=3407)
    prepared = {}
    for item in job["items"]:
        examples, _ = examples_for(job, item)
        rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8, return_tensors="pt")
        probe = collator([{**r, "attention_mask": [1] * len(r["input_ids"])} for r in rows[: item["batch"]]])
        # Every item's fixed-batch loss before any training, as the baseline takes it. unsloth's own forward may
        # refuse a no-grad call in training mode: then the row says nan and the timing still counts.
        try:
            loss = probe_loss(model, probe)
        except Exception as err:  # noqa: BLE001  reported, not fatal: speed and memory are this side's point
            print(f"bench: unsloth's fixed-batch loss failed: {type(err).__name__}: {err}", flush=True)
            loss = float("nan")
        prepared[item["name"]] = (rows, loss)
    results = []
    for index, item in enumerate(job["items"]):
        if index:
            fresh_adapter(model)
        rows, loss = prepared[item["name"]]
        meter = Meter(tokenizer.pad_token_id, None, job["warmup"])
        meter.probe_loss = loss
        config = SFTConfig(
            # gradient_accumulation_steps: TRL/unsloth defaulted to 2 at commit 4019192 (twice the other sides'
            # tokens per optimizer step); 1 like the others, so a step is the same work on every side.
            output_dir=tempfile.mkdtemp(dir=job["workdir"]), per_device_train_batch_size=item["batch"],
            gradient_accumulation_steps=1, max_length=item["max_len"], packing=item["kind"] == "variable",
            bf16=True, learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=0, optim=OPTIMIZER,
            max_steps=job["warmup"] + job["steps"], logging_steps=1, save_strategy="no", report_to=[], seed=42,
            dataset_num_proc=1)
        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                             args=config, callbacks=[meter.callback()])
        trainer.train()
        results.append({"side": "unsloth", "item": item["name"], "variant": f"unsloth {version('unsloth')}",
                        "settings": settings(item), "lora_dropout": 0.0, **meter.summary(),
                        **losses_of(trainer.state.log_history)})
        del trainer
        free_memory()
    return results
