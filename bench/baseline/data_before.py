"""qforge's data loader before issue 13 (commit 2a61a54 trainer/data.py), kept verbatim for bench/data_bench.py."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

from trainer.errors import UserError

IGNORE_INDEX = -100
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}

# A turn is (text, trained): prompts are context, responses are what the model learns to write.
Turn = Tuple[str, bool]


def read_records(path: str) -> List[Dict[str, Any]]:
    """JSONL (one object per line) or a JSON array, with errors that name the file and line."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"data file {path} does not exist; set data.path to an existing JSON or JSONL file.")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".json" or text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON (line {err.lineno}: {err.msg}); fix the file "
                            "or save it as JSONL with one object per line.") from None
        if not isinstance(records, list):
            raise UserError(f"{path} holds a JSON {type(records).__name__}, not a list of records; "
                            "wrap the records in a JSON array or use JSONL.")
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {number} is not valid JSON ({err.msg}); "
                                "fix or remove that line.") from None
    if not records:
        raise UserError(f"{path} holds no records; point data.path at a file with at least one example.")
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise UserError(f"{path} record {number} is a {type(record).__name__}, not an object; "
                            "each record must be a JSON object.")
    return records


def alpaca_turns(record: Dict[str, Any], where: str) -> List[Turn]:
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise UserError(f"{where} has no text field '{key}', which the alpaca format needs "
                            "(instruction, optional input, output); fix the record or set data.format.")
    extra = record.get("input") or ""
    template = PROMPT_WITH_INPUT if extra else PROMPT_NO_INPUT
    return [(template.format(instruction=record["instruction"], input=extra), False), (record["output"], True)]


def sharegpt_turns(record: Dict[str, Any], where: str) -> List[Turn]:
    messages = record.get("conversations", record.get("messages"))
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where} has no 'conversations' (or 'messages') list, which the sharegpt format "
                        "needs; fix the record or set data.format.")
    turns: List[Turn] = []
    for message in messages:
        role = SHAREGPT_ROLES.get(str(message.get("from", message.get("role"))))
        text = message.get("value", message.get("content"))
        if role is None or not isinstance(text, str):
            raise UserError(f"{where} has a message without a known role (from/role: human, gpt, user, "
                            "assistant, system) and a text value; fix that message.")
        if role == "assistant":
            turns.append((text, True))
        elif role == "user":
            turns.append((PROMPT_NO_INPUT.format(instruction=text), False))
        else:
            turns.append((text + "\n\n", False))
    if not any(trained for _, trained in turns):
        raise UserError(f"{where} has no assistant turn to learn from; add one or drop the record.")
    return turns


@dataclass
class Example:
    input_ids: List[int]
    labels: List[int]


def tokenize(turns: Sequence[Turn], tokenizer: Any, max_len: int) -> Example:
    ids: List[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels: List[int] = [IGNORE_INDEX] * len(ids)
    for text, trained in turns:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if trained:
            piece = piece + [tokenizer.eos_token_id]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return Example(ids[:max_len], labels[:max_len])


def load_examples(cfg: Any, tokenizer: Any) -> Tuple[List[Example], List[Example]]:
    """Read, check, tokenize and split the data set into (train, eval)."""
    path = cfg.data.path
    records = read_records(path)
    if cfg.data.max_samples:
        records = records[: cfg.data.max_samples]
    to_turns = alpaca_turns if cfg.data.format.value == "alpaca" else sharegpt_turns
    examples = []
    for number, record in enumerate(records, start=1):
        example = tokenize(to_turns(record, f"{path} record {number}"), tokenizer, cfg.train.max_seq_len)
        if any(label != IGNORE_INDEX for label in example.labels):
            examples.append(example)
    if not examples:
        raise UserError(f"{path}: every example's response was cut off by train.max_seq_len="
                        f"{cfg.train.max_seq_len}; raise it.")
    order = list(range(len(examples)))
    random.Random(cfg.data.split_seed).shuffle(order)
    n_eval = int(round(len(examples) * cfg.data.eval_fraction)) if cfg.do_eval else 0
    if cfg.do_eval and n_eval == 0:
        raise UserError(f"{path} has {len(examples)} usable examples, too few to hold out "
                        f"data.eval_fraction={cfg.data.eval_fraction} for eval; add data or set do_eval=false.")
    if n_eval >= len(examples):
        raise UserError(f"{path}: holding out {n_eval} of {len(examples)} examples leaves none to train on; "
                        "lower data.eval_fraction.")
    eval_set = [examples[i] for i in order[:n_eval]]
    train_set = [examples[i] for i in order[n_eval:]]
    return train_set, eval_set


class ExampleDataset:
    """A map-style dataset over tokenized examples (what the HF Trainer's sampler needs)."""

    def __init__(self, examples: List[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        example = self.examples[index]
        return {"input_ids": example.input_ids, "labels": example.labels}

    def __iter__(self) -> Iterator[Dict[str, List[int]]]:
        return (self[i] for i in range(len(self)))

    def token_count(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


class PadCollator:
    """Pads a batch to its longest example; padding is masked from attention and loss."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, batch: List[Dict[str, List[int]]]) -> Dict[str, Any]:
        import torch

        longest = max(len(item["input_ids"]) for item in batch)
        width = -(-longest // self.multiple) * self.multiple
        input_ids, labels, attention = [], [], []
        for item in batch:
            pad = width - len(item["input_ids"])
            input_ids.append(item["input_ids"] + [self.pad_token_id] * pad)
            labels.append(item["labels"] + [IGNORE_INDEX] * pad)
            attention.append([1] * len(item["input_ids"]) + [0] * pad)
        return {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(attention),
        }
