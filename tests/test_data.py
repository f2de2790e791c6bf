"""Prompt masking and formats: only responses (and their end-of-turn token) are learned, prompts never are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from trainer.compose import compose
from trainer.data import IGNORE_INDEX, PadCollator
from trainer.data.prepare import examples
from trainer.data.spec import data_spec
from trainer.tiny import TOKENIZER_DIR


def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def load(overrides: list, root: Path, tok=None):
    return examples(data_spec(compose([*overrides, f"output_root={root}"])), tok or tokenizer())


def learned(tok, example) -> str:
    return tok.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_alpaca_is_rendered_with_the_tokenizers_chat_template_and_learns_the_answer_and_end_of_turn(
        tmp_path: Path) -> None:
    tok = tokenizer()
    train, evals = load([], tmp_path, tok)
    assert len(train) > 300 and len(evals) > 30
    example = train[0]
    assert tok.decode(example.input_ids).startswith("<|im_start|>user\n")  # the shipped ChatML template
    text = learned(tok, example)
    assert "<|im_start|>" not in text and "user" not in text
    assert example.labels[-2] == tok.convert_tokens_to_ids("<|im_end|>")  # the answer ends its turn...
    assert example.labels[-1] == IGNORE_INDEX  # ...and the template's newline after it is not learned


def test_base_tokenizer_keeps_the_alpaca_prompt(tmp_path: Path) -> None:
    base = tokenizer()
    base.chat_template = None  # a base model's tokenizer
    train, _ = load([], tmp_path, base)
    example = train[0]
    text = learned(base, example)
    assert "### Response" not in text and "### Instruction" not in text
    assert example.input_ids[-1] == base.eos_token_id and example.labels[-1] == base.eos_token_id
    prompt = base.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX])
    assert "### Instruction" in prompt


@pytest.mark.parametrize("template", ["auto", "alpaca"])
def test_sharegpt_learns_every_assistant_turn_only(tmp_path: Path, template: str) -> None:
    path = tmp_path / "chat.jsonl"
    conv = {"conversations": [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "alpha"},
                              {"from": "human", "value": "again"}, {"from": "gpt", "value": "omega"}]}
    path.write_text((json.dumps(conv) + "\n") * 10)
    tok = tokenizer()
    train, _ = load(["data=sharegpt", f"data.path={path}", "data.eval_fraction=0.1", f"data.template={template}"],
                    tmp_path, tok)
    text = learned(tok, train[0])
    assert "alpha" in text and "omega" in text
    assert "hi there" not in text and "again" not in text


def test_split_is_deterministic_and_disjoint_by_position(tmp_path: Path) -> None:
    tok = tokenizer()
    train_a, eval_a = load([], tmp_path / "a", tok)
    train_b, eval_b = load([], tmp_path / "b", tok)
    assert [e.input_ids for e in eval_a] == [e.input_ids for e in eval_b]
    assert len(eval_a) == round(0.1 * (len(train_a) + len(eval_a)))
    other_seed = load(["data.split_seed=1"], tmp_path / "c", tok)[1]
    assert [e.input_ids for e in other_seed] != [e.input_ids for e in eval_a]


def test_collator_pads_with_masked_labels() -> None:
    batch = PadCollator(pad_token_id=3)([{"input_ids": [1, 2, 4], "labels": [-100, 2, 4]},
                                         {"input_ids": [1], "labels": [1]}])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][1, 1:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"].sum().item() == 4
