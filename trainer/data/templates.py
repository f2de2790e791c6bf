"""Chat templates: render a conversation the way the model is served, and find the tokens it learns.

A conversation is rendered by the model's own Jinja chat template (the tokenizer's `chat_template`, a named
one below, or a Jinja file) through transformers' renderer, the code `tokenizer.apply_chat_template` runs,
and tokenized as one text, exactly as `apply_chat_template(..., tokenize=True)` does. The trained tokens are
the assistant turns and their end-of-turn token, found one of two ways:

- generation markers: a template that wraps assistant output in `{% generation %}...{% endgeneration %}`
  reports those character spans while rendering (transformers' `return_assistant_tokens_mask` machinery);
- rendering offsets: for a template without markers, assistant turn i spans from the end of the rendering of
  turns < i with the generation prompt to the end of the rendering of turns <= i, cut after the template's
  end-of-turn token (what follows it, such as ChatML's newline, is template glue, not the answer).

Character spans become token spans through the fast tokenizer's offsets (char_to_token), as in transformers.
The Alpaca prompt (`alpaca`, or `auto` with a tokenizer that has no chat template) keeps qforge's original
"### Instruction / ### Response" rendering: bos, prompt, response, eos, each tokenized on its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from trainer.errors import UserError

Span = Tuple[int, int]

CHATML = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2.5-Instruct: ChatML with its default system prompt when the conversation has none.
QWEN2 = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}" + CHATML
)

# Llama-3-Instruct: bos, then a header per message, content trimmed, <|eot_id|> after each.
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Mistral-Instruct (v0.2/v0.3 text form): a system message is prepended to the first user turn.
MISTRAL = (
    "{{- bos_token }}"
    "{%- set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- set text = (system + '\\n\\n' + message['content']) if (system and loop.index0 <= 1) "
    "else message['content'] %}"
    "{{- '[INST] ' + text + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}"
    "{%- endif %}"
    "{%- endfor %}"
)


@dataclass(frozen=True)
class Named:
    text: str
    eot: str
    needs: Tuple[str, ...]  # tokens the tokenizer must hold as single tokens


NAMED: Dict[str, Named] = {
    "chatml": Named(CHATML, "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "qwen2": Named(QWEN2, "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "llama3": Named(LLAMA3, "<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "mistral": Named(MISTRAL, "{eos}", ()),
}
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class Template:
    """A resolved template: Jinja text (None for the Alpaca prompt) and its end-of-turn token."""

    name: str
    text: Optional[str]
    eot: Optional[str]
    kwargs: Dict[str, Any] = field(default_factory=dict)  # special tokens the Jinja sees (bos_token, ...)

    @property
    def is_alpaca(self) -> bool:
        return self.text is None

    @property
    def has_markers(self) -> bool:
        return bool(self.text) and bool(_GENERATION.search(self.text or ""))

    @property
    def mask_source(self) -> str:
        if self.is_alpaca:
            return "alpaca prompt (response + eos trained)"
        return "generation markers" if self.has_markers else "rendering offsets"


def tokenizer_template(tokenizer: Any) -> Optional[str]:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one renders conversations
        template = template.get("default")
    return template or None


def resolve(spec: Dict[str, Any], tokenizer: Any, chat_data: bool) -> Template:
    """The template a run renders with: from the spec's name (or Jinja file) and the loaded tokenizer."""
    name = spec["name"]
    kwargs = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
    if name == "alpaca":
        return Template("alpaca", None, tokenizer.eos_token, kwargs)
    if name == "auto":
        own = tokenizer_template(tokenizer)
        if own is None:
            if chat_data:
                raise UserError(no_template_message(getattr(tokenizer, "name_or_path", "the model")))
            return Template("alpaca (the tokenizer has no chat template)", None, tokenizer.eos_token, kwargs)
        template = Template("auto (the tokenizer's chat_template)", own, None, kwargs)
        template.eot = detect_eot(template, tokenizer)
        return template
    if name == "file":
        import hashlib
        from pathlib import Path

        path = Path(spec["path"])
        if not path.is_file():
            raise UserError(f"data.template file {path} does not exist; point data.template at a Jinja file.")
        text = path.read_text(encoding="utf-8")
        if hashlib.sha256(text.encode()).hexdigest() != spec["sha256"]:
            raise UserError(f"data.template file {path} changed after the run was planned; start the run again "
                            "so the plan (and the data cache key) see the new template.")
        template = Template(f"file {path}", text, None, kwargs)
        template.eot = detect_eot(template, tokenizer)
        return template
    named = NAMED[name]
    missing = [t for t in named.needs if not is_single_token(tokenizer, t)]
    if missing:
        raise UserError(f"data.template={name} needs the tokens {', '.join(missing)}, which this tokenizer does not "
                        "have (a quantized model's vocabulary cannot grow); pick the template the model was tuned "
                        "with (data.template=auto uses the tokenizer's own).")
    eot = named.eot.format(eos=tokenizer.eos_token) if "{eos}" in named.eot else named.eot
    return Template(name, named.text, eot, kwargs)


def no_template_message(model: str) -> str:
    return (f"the tokenizer of {model} has no chat template, so data.template=auto cannot render conversations; "
            "set data.template to chatml, llama3, qwen2, mistral or alpaca, or to a Jinja file.")


def is_single_token(tokenizer: Any, token: str) -> bool:
    ids = tokenizer.backend_tokenizer.encode(token, add_special_tokens=False).ids
    return len(ids) == 1


def detect_eot(template: Template, tokenizer: Any) -> Optional[str]:
    """The special token a template closes an assistant turn with (what a server stops generating at)."""
    probe = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A7x"}]
    try:
        text = render(template, [probe])[0][0]
    except UserError:
        return None
    at = text.rfind("A7x")
    tail = text[at + 3:] if at >= 0 else ""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    specials |= {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                 if getattr(t, "special", False)}
    found = [(tail.find(s), s) for s in specials if s and tail.find(s) >= 0]
    return min(found)[1] if found else None


def render(template: Template, conversations: Sequence[List[Dict[str, str]]],
           where: Sequence[str] = ()) -> List[Tuple[str, List[Span]]]:
    """Each conversation's rendered text and the character spans of its trained (assistant) parts."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def jinja(batch: Sequence[List[Dict[str, str]]], markers: bool = False, prompt: bool = False) -> Any:
        try:
            return render_jinja_template(conversations=list(batch), chat_template=template.text,
                                         return_assistant_tokens_mask=markers, add_generation_prompt=prompt,
                                         **template.kwargs)
        except Exception as err:  # jinja2's TemplateError, or raise_exception() inside the template
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            label = where[0] if len(where) == 1 else "a record"
            for i, conversation in enumerate(batch):  # name the record that fails, when a batch does
                try:
                    render_jinja_template(conversations=[conversation], chat_template=template.text,
                                          add_generation_prompt=prompt, **template.kwargs)
                except Exception:
                    label = where[i] if i < len(where) else label
                    break
            raise UserError(f"{label}: template {template.name} cannot render it ({first}); fix the record or "
                            "pick another data.template.") from None

    if template.has_markers:
        texts, indices = jinja(conversations, markers=True)
        return [(t, [tuple(s) for s in spans]) for t, spans in zip(texts, indices)]
    texts = jinja(conversations)[0]
    out = []
    for n, (conversation, text) in enumerate(zip(conversations, texts)):
        turns = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
        prefixes = jinja([conversation[:i] for i in turns], prompt=True)[0]
        uptos = jinja([conversation[: i + 1] for i in turns])[0]
        spans: List[Span] = []
        for prefix, upto in zip(prefixes, uptos):
            if not (upto.startswith(prefix) and text.startswith(upto)):
                label = where[n] if n < len(where) else "a conversation"
                raise UserError(f"{label}: template {template.name} renders earlier turns differently once later "
                                "ones follow, so the assistant turns cannot be located by rendering offsets; use a "
                                "template with {% generation %} markers or a named data.template.")
            start, end = len(prefix), len(upto)
            if template.eot:
                stop = text.find(template.eot, start, end)
                if stop >= 0:
                    end = stop + len(template.eot)
            spans.append((start, end))
        out.append((text, spans))
    return out


def encode(template: Template, tokenizer: Any, rendered: Sequence[Tuple[str, List[Span]]],
           max_len: int) -> List[Tuple[List[int], List[Span]]]:
    """Token ids of each rendered text (one text, no added special tokens) and its trained token spans."""
    backend = fast_backend(tokenizer)
    encodings = backend.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    out = []
    for encoding, (_, spans) in zip(encodings, rendered):
        ids = encoding.ids
        token_spans = []
        for start, end in spans:
            if end <= start:
                continue
            first = encoding.char_to_token(start)
            last = encoding.char_to_token(end - 1)
            if first is None:
                continue
            token_spans.append((first, (last + 1) if last is not None else len(ids)))
        out.append((ids[:max_len], [(a, min(b, max_len)) for a, b in token_spans if a < max_len]))
    return out


def encode_turns(tokenizer: Any, turns_batch: Sequence[Sequence[Tuple[str, bool]]],
                 max_len: int) -> List[Tuple[List[int], List[Span]]]:
    """The Alpaca prompt: bos, then each turn tokenized on its own; trained turns end with eos."""
    backend = fast_backend(tokenizer)
    flat = [text for turns in turns_batch for text, _ in turns]
    pieces = iter(backend.encode_batch(flat, add_special_tokens=False)) if flat else iter(())
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = []
    for turns in turns_batch:
        ids: List[int] = [bos] if bos is not None else []
        spans: List[Span] = []
        for _, trained in turns:
            piece = next(pieces).ids
            if trained:
                piece = piece + [eos]
                spans.append((len(ids), len(ids) + len(piece)))
            ids += piece
        out.append((ids[:max_len], [(a, min(b, max_len)) for a, b in spans if a < max_len]))
    return out


def fast_backend(tokenizer: Any) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'the model')} is not a fast "
                        "(tokenizers-backed) tokenizer, which qforge needs to locate assistant turns; convert it "
                        "with transformers (AutoTokenizer.from_pretrained(..., use_fast=True)) and save it.")
    return backend
