"""Regenerates the shipped sample data and tokenizer. Deterministic; run by hand, never at train time.

    python -m trainer.assets.build_assets

The sample set is instruction-style and small on purpose: a few hundred examples drawn from a handful
of task families with regular answers (arithmetic, word opposites, list reversal, counting, capitals),
so a tiny randomly initialised model measurably lowers its held-out loss within a minute on a CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from trainer.data.templates import CHATML

HERE = Path(__file__).parent
SAMPLE = HERE / "sample_instructions.jsonl"
SAMPLE_CHAT = HERE / "sample_conversations.jsonl"
TOKENIZER_DIR = HERE / "tokenizer"

OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "happy": "sad",
    "early": "late", "open": "closed", "full": "empty", "old": "young", "hard": "soft", "loud": "quiet",
    "wet": "dry", "rich": "poor", "strong": "weak", "thick": "thin", "high": "low", "near": "far",
}
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Greece": "Athens", "Poland": "Warsaw", "Chile": "Santiago", "India": "New Delhi",
}
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "chair", "piano", "garden", "rocket",
         "candle", "forest", "mirror", "pencil", "window", "bridge", "castle", "dragon", "planet"]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _example(rng: random.Random) -> dict:
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randrange(0, 50), rng.randrange(0, 50)
        return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": f"The sum is {a + b}."}
    if kind == 1:
        word = rng.choice(sorted(OPPOSITES))
        return {"instruction": f"What is the opposite of '{word}'?", "input": "",
                "output": f"The opposite of '{word}' is '{OPPOSITES[word]}'."}
    if kind == 2:
        items = rng.sample(WORDS, rng.randrange(3, 6))
        return {"instruction": "Reverse the order of the words.", "input": " ".join(items),
                "output": " ".join(reversed(items))}
    if kind == 3:
        n = rng.randrange(1, 11)
        word = rng.choice(WORDS)
        return {"instruction": f"How many times does the word '{word}' appear?", "input": " ".join([word] * n),
                "output": f"It appears {NUMBER_WORDS[n]} times."}
    if kind == 4:
        country = rng.choice(sorted(CAPITALS))
        return {"instruction": f"What is the capital of {country}?", "input": "",
                "output": f"The capital of {country} is {CAPITALS[country]}."}
    items = sorted(rng.sample(range(100), rng.randrange(3, 7)), key=lambda _: rng.random())
    return {"instruction": "Sort the numbers from smallest to largest.", "input": " ".join(map(str, items)),
            "output": " ".join(map(str, sorted(items)))}


def build_samples(n: int = 480, seed: int = 1234) -> list[dict]:
    rng = random.Random(seed)
    return [_example(rng) for _ in range(n)]


def build_conversations(samples: list[dict], n: int = 120, seed: int = 99) -> list[dict]:
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        turns = []
        for ex in rng.sample(samples, rng.randrange(1, 4)):
            question = ex["instruction"] + (f"\n{ex['input']}" if ex["input"] else "")
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": ex["output"]}]
        convs.append({"conversations": turns})
    return convs


def build_tokenizer(texts: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    # ChatML's turn markers join after training, so the learned BPE vocabulary (ids 0-807) is unchanged.
    tok.add_special_tokens(CHAT_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", additional_special_tokens=CHAT_TOKENS)
    fast.model_max_length = 4096
    # The default run renders data with the tokenizer's own template (data.template=auto), as a real
    # instruct model's run would: ChatML, with generation markers around the assistant turns.
    fast.chat_template = CHATML
    fast.save_pretrained(TOKENIZER_DIR)


def main() -> None:
    samples = build_samples()
    SAMPLE.write_text("".join(json.dumps(s) + "\n" for s in samples))
    convs = build_conversations(samples)
    SAMPLE_CHAT.write_text("".join(json.dumps(c) + "\n" for c in convs))
    template_words = ["### Instruction:", "### Input:", "### Response:", "Below is an instruction"]
    texts = [f"{s['instruction']}\n{s['input']}\n{s['output']}" for s in samples] + template_words * 50
    build_tokenizer(texts)
    print(f"wrote {SAMPLE}, {SAMPLE_CHAT} and {TOKENIZER_DIR}")


if __name__ == "__main__":
    main()
