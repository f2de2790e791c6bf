"""Records: a source's row, read through data.columns, as a conversation or (Alpaca prompt) as turns.

Every problem is a UserError naming the source and record and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

from trainer.errors import UserError

PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}

# A turn is (text, trained): prompts are context, responses are what the model learns to write.
Turn = Tuple[str, bool]
Message = Dict[str, str]


def column(columns: Mapping[str, str], name: str) -> str:
    """The source's column (or message key) that holds qforge's field `name`."""
    return columns.get(name, name)


def alpaca_fields(record: Mapping[str, Any], columns: Mapping[str, str], where: str) -> Dict[str, str]:
    out = {}
    for key in ("instruction", "output"):
        value = record.get(column(columns, key))
        if not isinstance(value, str):
            fields = ", ".join(sorted(record)) or "none"
            raise UserError(f"{where} has no text field '{column(columns, key)}' (its fields: {fields}), which the "
                            "alpaca format needs (instruction, optional input, output); map yours with "
                            f"data.columns (e.g. +data.columns.{key}=<your column>) or set data.format.")
        out[key] = value
    for key in ("input", "system"):
        value = record.get(column(columns, key))
        out[key] = value if isinstance(value, str) else ""
    return out


def alpaca_messages(record: Mapping[str, Any], columns: Mapping[str, str], where: str) -> List[Message]:
    """An Alpaca record as a user/assistant conversation (instruction, then the input on its own line)."""
    f = alpaca_fields(record, columns, where)
    user = f["instruction"] + (f"\n{f['input']}" if f["input"] else "")
    messages = [{"role": "system", "content": f["system"]}] if f["system"] else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": f["output"]}]


def sharegpt_messages(record: Mapping[str, Any], columns: Mapping[str, str], where: str) -> List[Message]:
    """conversations (from/value) or messages (role/content), roles normalised to system/user/assistant."""
    key = column(columns, "conversations")
    messages = record.get(key)
    if messages is None and "conversations" not in columns:
        messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        fields = ", ".join(sorted(record)) or "none"
        raise UserError(f"{where} has no '{key}' (or 'messages') list (its fields: {fields}), which the sharegpt "
                        f"format needs; map yours with +data.columns.conversations=<your column> or set data.format.")
    role_key, content_key = column(columns, "role"), column(columns, "content")
    out: List[Message] = []
    system = record.get(column(columns, "system"))
    if isinstance(system, str) and system:
        out.append({"role": "system", "content": system})
    for message in messages:
        if not isinstance(message, Mapping):
            raise UserError(f"{where} has a message that is not an object; each message needs a role and a text.")
        role = SHAREGPT_ROLES.get(str(message.get(role_key, message.get("from", message.get("role")))))
        text = message.get(content_key, message.get("value", message.get("content")))
        if role is None or not isinstance(text, str):
            raise UserError(f"{where} has a message without a known role (from/role: human, gpt, user, "
                            "assistant, system) and a text value; fix that message or map its keys with "
                            "+data.columns.role / +data.columns.content.")
        out.append({"role": role, "content": text})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where} has no assistant turn to learn from; add one or drop the record.")
    return out


def to_messages(record: Mapping[str, Any], fmt: str, columns: Mapping[str, str], where: str) -> List[Message]:
    if fmt == "alpaca":
        return alpaca_messages(record, columns, where)
    return sharegpt_messages(record, columns, where)


# ---- the Alpaca prompt (data.template=alpaca, or auto with a tokenizer that has no chat template) ----

def alpaca_turns(record: Mapping[str, Any], where: str, columns: Mapping[str, str] | None = None) -> List[Turn]:
    f = alpaca_fields(record, columns or {}, where)
    template = PROMPT_WITH_INPUT if f["input"] else PROMPT_NO_INPUT
    prompt = template.format(instruction=f["instruction"], input=f["input"])
    if f["system"]:
        prompt = f["system"] + "\n\n" + prompt
    return [(prompt, False), (f["output"], True)]


def sharegpt_turns(record: Mapping[str, Any], where: str, columns: Mapping[str, str] | None = None) -> List[Turn]:
    return messages_as_turns(sharegpt_messages(record, columns or {}, where))


def messages_as_turns(messages: List[Message]) -> List[Turn]:
    turns: List[Turn] = []
    for message in messages:
        if message["role"] == "assistant":
            turns.append((message["content"], True))
        elif message["role"] == "user":
            turns.append((PROMPT_NO_INPUT.format(instruction=message["content"]), False))
        else:
            turns.append((message["content"] + "\n\n", False))
    return turns


def to_turns(record: Mapping[str, Any], fmt: str, columns: Mapping[str, str], where: str) -> List[Turn]:
    if fmt == "alpaca":
        return alpaca_turns(record, where, columns)
    return sharegpt_turns(record, where, columns)


# ---- a plain JSON / JSONL reader (export calibration texts, error lines for malformed files) ----

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


def first_bad_json_line(path: str) -> Tuple[int, str] | None:
    """(line number, error) of the first line of a JSONL file that does not parse, streaming the file."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                return number, err.msg
            if not isinstance(value, dict):
                return number, f"a {type(value).__name__}, not an object"
    return None
