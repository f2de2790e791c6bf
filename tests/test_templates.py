"""Chat templates: exactly the assistant turns and their end-of-turn token are trained, token by token.

Both ways of locating the turns are checked: generation markers ({% generation %} in the template, what
transformers' return_assistant_tokens_mask reads) and rendering offsets (the same template without markers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

import pytest
from transformers import AutoTokenizer

from trainer.compose import compose
from trainer.data import IGNORE_INDEX, templates
from trainer.data.prepare import examples
from trainer.data.spec import data_spec
from trainer.errors import UserError
from trainer.tiny import TOKENIZER_DIR

LLAMA3_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of Peru?"},
    {"role": "assistant", "content": "The capital of Peru is Lima."},
    {"role": "user", "content": "And of Norway?"},
    {"role": "assistant", "content": "Oslo."},
]


@pytest.fixture(scope="module")
def tok():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *LLAMA3_TOKENS]})
    return tokenizer


def pieces_to_tokens(tok, pieces: List[Tuple[str, bool]]) -> Tuple[List[int], List[bool]]:
    """The expected ids and trained flags, built piece by piece: special tokens by id, text on its own."""
    ids: List[int] = []
    trained: List[bool] = []
    specials = set(tok.all_special_tokens)
    for text, learn in pieces:
        piece = [tok.convert_tokens_to_ids(text)] if text in specials else \
            tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
        ids += piece
        trained += [learn] * len(piece)
    return ids, trained


def chatml_pieces() -> List[Tuple[str, bool]]:
    return [("<|im_start|>", False), ("system\nBe brief.", False), ("<|im_end|>", False), ("\n", False),
            ("<|im_start|>", False), ("user\nWhat is the capital of Peru?", False), ("<|im_end|>", False),
            ("\n", False), ("<|im_start|>", False), ("assistant\n", False),
            ("The capital of Peru is Lima.", True), ("<|im_end|>", True), ("\n", False),
            ("<|im_start|>", False), ("user\nAnd of Norway?", False), ("<|im_end|>", False), ("\n", False),
            ("<|im_start|>", False), ("assistant\n", False), ("Oslo.", True), ("<|im_end|>", True), ("\n", False)]


def llama3_pieces(bos: str) -> List[Tuple[str, bool]]:
    def header(role: str) -> List[Tuple[str, bool]]:
        return [("<|start_header_id|>", False), (role, False), ("<|end_header_id|>", False), ("\n\n", False)]

    return [(bos, False), *header("system"), ("Be brief.", False), ("<|eot_id|>", False),
            *header("user"), ("What is the capital of Peru?", False), ("<|eot_id|>", False),
            *header("assistant"), ("The capital of Peru is Lima.", True), ("<|eot_id|>", True),
            *header("user"), ("And of Norway?", False), ("<|eot_id|>", False),
            *header("assistant"), ("Oslo.", True), ("<|eot_id|>", True)]


def without_markers(text: str) -> str:
    return text.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def encoded(template: templates.Template, tok, max_len: int = 512) -> Tuple[List[int], List[bool]]:
    ids, spans = templates.encode(template, tok, templates.render(template, [CONVERSATION]), max_len)[0]
    trained = [False] * len(ids)
    for start, end in spans:
        trained[start:end] = [True] * (end - start)
    return ids, trained


@pytest.mark.parametrize("name", ["chatml", "llama3"])
@pytest.mark.parametrize("markers", [True, False], ids=["generation-markers", "rendering-offsets"])
def test_multi_turn_trains_exactly_the_assistant_turns_and_their_end_of_turn_token(tok, name: str,
                                                                                   markers: bool) -> None:
    template = templates.resolve({"name": name}, tok, chat_data=True)
    if not markers:
        template = templates.Template(name, without_markers(template.text), template.eot, template.kwargs)
    assert template.mask_source == ("generation markers" if markers else "rendering offsets")
    ids, trained = encoded(template, tok)
    expected_ids, expected_trained = pieces_to_tokens(tok, chatml_pieces() if name == "chatml"
                                                      else llama3_pieces(tok.bos_token))
    assert ids == expected_ids
    assert trained == expected_trained, [(tok.decode([i]), t) for i, t in zip(ids, trained)]
    # The same ids and mask transformers' apply_chat_template gives for a template with generation markers.
    reference = tok.apply_chat_template(CONVERSATION, chat_template=templates.NAMED[name].text, tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    assert ids == reference["input_ids"] and [bool(m) for m in reference["assistant_masks"]] == trained


def test_tokenizers_own_template_without_markers_is_located_by_offsets(tok) -> None:
    own = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    own.chat_template = without_markers(own.chat_template)  # a template as most models ship it
    template = templates.resolve({"name": "auto"}, own, chat_data=True)
    assert template.mask_source == "rendering offsets" and template.eot == "<|im_end|>"
    ids, trained = encoded(template, own)
    expected_ids, expected_trained = pieces_to_tokens(own, chatml_pieces())
    assert ids == expected_ids and trained == expected_trained
    assert ids == own.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]


def test_truncation_keeps_the_mask_aligned(tok) -> None:
    template = templates.resolve({"name": "chatml"}, tok, chat_data=True)
    full_ids, full_trained = encoded(template, tok)
    ids, trained = encoded(template, tok, max_len=30)
    assert ids == full_ids[:30] and trained == full_trained[:30]


def test_qwen2_adds_its_default_system_prompt_and_mistral_folds_the_system_prompt_in(tok) -> None:
    qwen = templates.resolve({"name": "qwen2"}, tok, chat_data=True)
    text = templates.render(qwen, [CONVERSATION[1:3]])[0][0]
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    mistral = templates.resolve({"name": "mistral"}, tok, chat_data=True)
    assert mistral.eot == tok.eos_token
    text, spans = templates.render(mistral, [CONVERSATION])[0]
    assert text.startswith(tok.bos_token + "[INST] Be brief.\n\nWhat is the capital of Peru? [/INST]")
    assert [text[a:b] for a, b in spans] == ["The capital of Peru is Lima." + tok.eos_token, "Oslo." + tok.eos_token]


def test_named_template_needs_its_tokens(tok) -> None:
    plain = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    with pytest.raises(UserError, match="needs the tokens <\\|start_header_id\\|>"):
        templates.resolve({"name": "llama3"}, plain, chat_data=True)


def test_a_jinja_file_template_and_its_errors(tmp_path: Path) -> None:
    jinja = tmp_path / "strict.jinja"
    jinja.write_text(
        "{%- for m in messages %}{%- if m['role'] == 'system' %}{{ raise_exception('no system turns') }}{%- endif %}"
        "{{- '<|im_start|>' + m['role'] + '\\n' }}{%- if m['role'] == 'assistant' %}{% generation %}"
        "{{- m['content'] + '<|im_end|>' }}{% endgeneration %}{%- else %}{{- m['content'] + '<|im_end|>' }}"
        "{%- endif %}{{- '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
        "{%- endif %}")
    data = tmp_path / "chats.jsonl"
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text((json.dumps(chat) + "\n") * 5)
    cfg = compose(["data=sharegpt", f"data.path={data}", f"data.template={jinja}", "do_eval=false",
                   "data.eval_fraction=0", f"output_root={tmp_path}"])
    spec = data_spec(cfg)
    assert spec["template"]["path"] == str(jinja) and len(spec["template"]["sha256"]) == 64
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    train, _ = examples(spec, tok)
    assert tok.decode([t for t, lab in zip(train[0].input_ids, train[0].labels) if lab != IGNORE_INDEX]) == \
        "hello<|im_end|>"

    system = {"messages": [{"role": "system", "content": "s"}, *chat["messages"]]}
    data.write_text(json.dumps(chat) + "\n" + json.dumps(system) + "\n")
    with pytest.raises(UserError, match=r"chats.jsonl record 2: template file .*strict.jinja cannot render it "
                                        r"\(no system turns\)"):
        examples(data_spec(cfg), tok)
    jinja.write_text(jinja.read_text() + " ")
    with pytest.raises(UserError, match="changed after the run was planned"):
        examples(spec, tok)


def test_a_conversation_without_an_assistant_turn_is_named(tmp_path: Path) -> None:
    data = tmp_path / "chats.jsonl"
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    bad = {"conversations": [{"from": "human", "value": "hi"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    cfg = compose(["data=sharegpt", f"data.path={data}", "do_eval=false", "data.eval_fraction=0",
                   f"output_root={tmp_path}"])
    with pytest.raises(UserError, match="chats.jsonl record 2 has no assistant turn to learn from"):
        examples(data_spec(cfg), AutoTokenizer.from_pretrained(TOKENIZER_DIR))
