"""The speed pass changes how fast, not what is learned: packed rows + chunked loss = padded loss and grads."""

from __future__ import annotations

import random

import pytest
import torch

from trainer import fused_loss
from trainer.data import IGNORE_INDEX, Example, PadCollator
from trainer.packing import PackedCollator, PackedDataset, pack
from trainer.schema import TinyArch
from trainer.tiny import ensure_tiny_model


def _examples(n: int, seed: int = 0, vocab: int = 800) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, 60)
        ids = [rng.randrange(4, vocab) for _ in range(length)]
        prompt = rng.randint(1, length - 1)
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def test_pack_keeps_every_example_once_within_capacity() -> None:
    examples = _examples(200)
    bins = pack(examples, capacity=128, seed=1)
    assert sorted(id(e) for b in bins for e in b) == sorted(id(e) for e in examples)
    assert all(sum(len(e.input_ids) for e in b) <= 128 for b in bins)
    # Best-fit decreasing leaves little room: within one bin of the lower bound.
    total = sum(len(e.input_ids) for e in examples)
    assert len(bins) <= -(-total // 128) + 1


def test_packed_row_restarts_positions_and_ignores_first_label() -> None:
    a, b = Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), Example([8, 9], [8, 9])
    data = PackedDataset([a, b], capacity=8)
    batch = PackedCollator(pad_token_id=0)([data[0]])
    assert batch["position_ids"].tolist()[0][:5] in ([0, 1, 2, 0, 1], [0, 1, 0, 1, 2])
    labels = batch["labels"].tolist()[0]
    assert labels[:5] in ([IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9], [IGNORE_INDEX, 9, IGNORE_INDEX, 6, 7])
    assert "attention_mask" not in batch and batch["input_ids"].shape[1] % 8 == 0


@pytest.fixture(scope="module")
def tiny_model_dir():
    return ensure_tiny_model(TinyArch())


def _loss_and_grads(model_dir, batch: dict, fused: bool) -> tuple:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False  # as qforge loads it: with a cache, transformers ignores packed position ids
    model.lm_head.weight.requires_grad_(False)  # frozen, as under LoRA
    if fused:
        assert fused_loss.install(model)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("chunk_elements", [fused_loss.CHUNK_ELEMENTS, 1000])
def test_packed_chunked_loss_equals_padded_stock_loss(tiny_model_dir, monkeypatch, chunk_elements: int) -> None:
    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", chunk_elements)  # 1000: a chunk of one token
    examples = _examples(6, seed=3)
    padded = PadCollator(pad_token_id=3)([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    packed_set = PackedDataset(examples, capacity=128)
    packed = PackedCollator(pad_token_id=3)([packed_set[i] for i in range(len(packed_set))])
    assert packed["input_ids"].numel() < padded["input_ids"].numel()

    stock_loss, stock_grads = _loss_and_grads(tiny_model_dir, padded, fused=False)
    fused_value, fused_grads = _loss_and_grads(tiny_model_dir, packed, fused=True)
    torch.testing.assert_close(fused_value, stock_loss, rtol=1e-5, atol=1e-5)
    assert set(fused_grads) == set(stock_grads) and "lm_head.weight" not in fused_grads
    for name, grad in stock_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_forward_evaluates_with_the_chunked_loss_and_leaves_unlabelled_calls_to_the_stock_head(
        tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    def load() -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        model.lm_head.weight.requires_grad_(False)
        return model

    stock, model = load(), load()
    assert fused_loss.install(model)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    labels = ids.clone()
    labels[0, :2] = fused_loss.IGNORE_INDEX
    with torch.no_grad():  # how the Trainer evaluates: the loss only, no logits kept
        out, reference = model(input_ids=ids, labels=labels), stock(input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # generation and probes: no labels, the stock head's logits
        assert torch.equal(model(input_ids=ids).logits, stock(input_ids=ids).logits)
