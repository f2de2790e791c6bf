"""Prompt masking and formats: only responses are learned, prompts never are."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from trainer.compose import compose
from trainer.data import IGNORE_INDEX, PadCollator, load_examples
from trainer.plan import build_plan
from trainer.tiny import TOKENIZER_DIR


def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def data_of(overrides: list) -> object:
    """The data part of the plan a run with these overrides would train from."""
    return build_plan(compose(overrides)).data


def test_alpaca_masks_the_prompt_and_learns_the_response_and_eos() -> None:
    tok = tokenizer()
    train, evals = load_examples(data_of([]), tok)
    assert len(train) > 300 and len(evals) > 30
    example = train[0]
    learned = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    text = tok.decode(learned)
    assert "### Response" not in text and "### Instruction" not in text
    assert learned[-1] == tok.eos_token_id
    prompt = tok.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX])
    assert "### Instruction" in prompt


def test_sharegpt_learns_every_assistant_turn_only(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    conv = {"conversations": [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "alpha"},
                              {"from": "human", "value": "again"}, {"from": "gpt", "value": "omega"}]}
    path.write_text((json.dumps(conv) + "\n") * 10)
    cfg = data_of(["data=sharegpt", f"data.path={path}", "data.eval_fraction=0.1"])
    tok = tokenizer()
    train, _ = load_examples(cfg, tok)
    learned = tok.decode([t for t, lab in zip(train[0].input_ids, train[0].labels) if lab != IGNORE_INDEX])
    assert "alpha" in learned and "omega" in learned
    assert "hi there" not in learned and "again" not in learned


def test_split_is_deterministic_and_disjoint_by_position() -> None:
    tok = tokenizer()
    cfg = data_of([])
    train_a, eval_a = load_examples(cfg, tok)
    train_b, eval_b = load_examples(cfg, tok)
    assert [e.input_ids for e in eval_a] == [e.input_ids for e in eval_b]
    assert len(eval_a) == round(0.1 * (len(train_a) + len(eval_a)))
    other_seed = load_examples(data_of(["data.split_seed=1"]), tok)[1]
    assert [e.input_ids for e in other_seed] != [e.input_ids for e in eval_a]


def test_collator_pads_with_masked_labels() -> None:
    batch = PadCollator(pad_token_id=3)([{"input_ids": [1, 2, 4], "labels": [-100, 2, 4]},
                                         {"input_ids": [1], "labels": [1]}])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][1, 1:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"].sum().item() == 4
