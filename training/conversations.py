"""Reading chat data: users' conversation JSONL and prompt files, rendered with a chat template.

Conversation JSONL (one conversation per line), either layout:
- ShareGPT-like: {"conversations": [{"from": "human"|"gpt"|"system"|..., "value": "..."}, ...]}
- OpenAI-like:   {"messages": [{"role": "user"|"assistant"|"system", "content": "..."}, ...]}
Optional keys: "id", "split" ("train" | "heldout"; default: by a hash of the first user turn).
A malformed line raises DataError naming the file, the line and the problem; nothing is skipped.

Prompt files (`--prompts-file`): a JSON array of strings or of {"prompt": ...} objects, or JSONL
with one string or {"prompt": ..., "split"?: ..., "id"?: ...} per line (what
`python -m training.data export-prompts` writes).
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.dataset import SPLITS, DataError, Example, split_of

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
         "system": "system"}


@dataclass(frozen=True)
class Conversation:
    id: str
    split: str  # "train" | "heldout"
    messages: list[dict[str, str]]  # [{"role": "user"|"assistant"|"system", "content": str}]


@dataclass(frozen=True)
class Prompt:
    id: str
    split: str
    text: str  # the first user turn


def read_conversations(path: str | Path, heldout_fraction: float,
                       require_assistant: bool = True) -> list[Conversation]:
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                out.append(_parse_conversation(line, f"{path}:{lineno}", lineno, heldout_fraction,
                                               require_assistant))
    if not out:
        raise DataError(f"{path}: holds no conversations")
    return out


def _parse_conversation(line: str, where: str, lineno: int, heldout_fraction: float,
                        require_assistant: bool) -> Conversation:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object with 'conversations' or 'messages', "
                        f"got {type(raw).__name__}")
    if "conversations" in raw:
        turns, role_key, text_key = raw["conversations"], "from", "value"
    elif "messages" in raw:
        turns, role_key, text_key = raw["messages"], "role", "content"
    else:
        raise DataError(f"{where}: no 'conversations' (ShareGPT) or 'messages' (OpenAI) key; "
                        f"keys are {sorted(raw)}")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: the turn list must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise DataError(f"{where}: turn {i} must be an object with {role_key!r} and "
                            f"{text_key!r}, got {_short(turn)}")
        role = ROLES.get(str(turn[role_key]).lower())
        if role is None:
            raise DataError(f"{where}: turn {i} has unknown {role_key} {turn[role_key]!r} "
                            f"(known: {sorted(ROLES)})")
        if not isinstance(turn[text_key], str):
            raise DataError(f"{where}: turn {i} {text_key!r} must be a string, got "
                            f"{type(turn[text_key]).__name__}")
        messages.append({"role": role, "content": turn[text_key]})
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise DataError(f"{where}: has no user turn")
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: has no assistant turn to train on (pass --regenerate to have "
                        "the model answer)")
    split = raw.get("split") or split_of(users[0]["content"], heldout_fraction)
    if split not in SPLITS:
        raise DataError(f"{where}: split {split!r} is not one of {SPLITS}")
    return Conversation(str(raw.get("id", f"line-{lineno}")), split, messages)


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_prompts(path: str | Path, heldout_fraction: float) -> list[Prompt]:
    """Prompts from a JSON list or JSONL file (``.gz``: gzip-compressed, e.g. to carry 10k
    prompts to a GPU machine in 3.5 MB)."""
    path = Path(path)
    if path.suffix == ".gz":
        try:
            text = gzip.decompress(path.read_bytes()).decode()
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut file: EOFError
            raise DataError(f"{path}: not a whole gzip file ({e}); compress it with gzip -9, "
                            f"or pass the uncompressed .jsonl") from None
    else:
        text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            items = [(i + 1, item) for i, item in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        where = "item"
    else:
        items = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    items.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        where = "line"
    prompts = [_parse_prompt(item, f"{path} {where} {n}" if where == "item" else f"{path}:{n}", n,
                             heldout_fraction) for n, item in items]
    if not prompts:
        raise DataError(f"{path}: holds no prompts")
    return prompts


def _parse_prompt(item: Any, where: str, n: int, heldout_fraction: float) -> Prompt:
    if isinstance(item, str):
        item = {"prompt": item}
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
        raise DataError(f"{where}: expected a non-empty string or an object with a non-empty "
                        f"'prompt' string, got {_short(item)}")
    split = item.get("split") or split_of(item["prompt"], heldout_fraction)
    if split not in SPLITS:
        raise DataError(f"{where}: split {split!r} is not one of {SPLITS}")
    return Prompt(str(item.get("id", f"prompt-{n}")), split, item["prompt"])


# ---------------------------------------------------------------------------------------------
# rendering with the chat template
# ---------------------------------------------------------------------------------------------
def encode_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_conversation(tokenizer, conv: Conversation) -> Example:
    """Token ids of the conversation (up to its last assistant turn) and the assistant spans.

    Turn i's span runs from the end of the rendered prefix (with the generation prompt) to the
    end of the rendering up to turn i, cut after its last EOS token (template newlines after the
    end-of-turn token are not targets)."""
    last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
    full = encode_chat(tokenizer, conv.messages[: last + 1], add_generation_prompt=False)
    eos = tokenizer.eos_token_id
    spans = []
    for i, m in enumerate(conv.messages[: last + 1]):
        if m["role"] != "assistant":
            continue
        start = len(encode_chat(tokenizer, conv.messages[:i], add_generation_prompt=True))
        upto = encode_chat(tokenizer, conv.messages[: i + 1], add_generation_prompt=False)
        if full[: len(upto)] != upto or upto[:start] != full[:start]:
            raise DataError(f"conversation {conv.id}: the chat template does not render turn {i} as "
                            "a prefix of the whole conversation; assistant spans cannot be located")
        end = len(upto)
        answer = upto[start:]
        if eos is not None and eos in answer:
            end = start + len(answer) - answer[::-1].index(eos)
        if end > start:
            spans.append((start, end))
    if not spans:
        raise DataError(f"conversation {conv.id}: every assistant turn renders to no tokens")
    return Example(conv.id, conv.split, full, spans)
