"""trainer/step_syncs.py: the tokens-seen count read back lazily is the Trainer's own count, step for step."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from trainer import step_syncs
from trainer.data import IGNORE_INDEX, Example, ExampleDataset, PadCollator
from trainer.packing import PackedCollator, PackedDataset
from trainer.schema import TinyArch
from trainer.tiny import TOKENIZER_DIR, ensure_tiny_model


def _examples(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(5, 50)
        ids = [rng.randrange(4, 800) for _ in range(length)]
        out.append(Example(ids, [IGNORE_INDEX] * 2 + ids[2:]))
    return out


class _SeenAtStepEnd:
    """Records state.num_input_tokens_seen as the callbacks after step_syncs' see it at each step's end."""

    def __init__(self) -> None:
        self.seen: list = []

    def callback(self):
        from transformers import TrainerCallback

        recorder = self

        class Recorder(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                recorder.seen.append((state.global_step, state.num_input_tokens_seen))

        return Recorder()


def _train(tmp_path: Path, name: str, lazy: bool, packed: bool) -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(TinyArch()), dtype=torch.float32)
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=2, max_steps=7,
                             logging_steps=3, save_steps=4, save_strategy="steps", report_to=[], use_cpu=True,
                             include_num_input_tokens_seen="non_padding", logging_nan_inf_filter=False,
                             remove_unused_columns=False, dataloader_num_workers=0, seed=3, disable_tqdm=True)
    if packed:  # rows without an attention mask: the count is the ids that are not padding
        data, collator = PackedDataset(_examples(60), capacity=64), PackedCollator(pad_token_id=tokenizer.pad_token_id)
    else:  # padded batches: the count is the attention mask's sum
        data, collator = ExampleDataset(_examples(60)), PadCollator(pad_token_id=tokenizer.pad_token_id)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator, processing_class=tokenizer)
    if lazy:
        trainer.add_callback(step_syncs.install(trainer, world_size=1))
    recorder = _SeenAtStepEnd()
    trainer.add_callback(recorder.callback())
    trainer.train()
    logged = [(h["step"], h["num_input_tokens_seen"]) for h in trainer.state.log_history
              if "num_input_tokens_seen" in h]
    saved = json.loads((tmp_path / name / "checkpoint-4" / "trainer_state.json").read_text())
    return trainer.state.num_input_tokens_seen, logged, saved["num_input_tokens_seen"], recorder.seen


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_lazy_token_count_matches_the_trainers_own(tmp_path: Path, packed: bool) -> None:
    eager_total, eager_logged, eager_saved, eager_seen = _train(tmp_path, "eager", lazy=False, packed=packed)
    lazy_total, lazy_logged, lazy_saved, lazy_seen = _train(tmp_path, "lazy", lazy=True, packed=packed)
    assert eager_total > 0
    assert lazy_total == eager_total
    assert lazy_logged == eager_logged and len(lazy_logged) >= 2  # logged at steps 3 and 6, and the summary at 7
    assert lazy_saved == eager_saved  # the checkpoint's trainer_state.json
    by_step = dict(eager_seen)
    for step, seen in lazy_seen:
        if step in (3, 4, 6, 7):  # logs (3, 6), saves (4), the last step: read back before anyone reads it
            assert seen == by_step[step], step
    # Between those steps the count stays on the device: step 1 and 2 end with nothing read back yet.
    assert dict(lazy_seen)[1] == 0 and dict(lazy_seen)[2] == 0 and by_step[2] > by_step[1] > 0
