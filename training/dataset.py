"""The training-data record (token ids as JSONL), the held-out split, and Medusa labels.

One JSON object per line:

    {"id": "sharegpt-00042", "split": "train", "input_ids": [...], "spans": [[37, 290]]}

`input_ids` is the conversation rendered with the model's chat template and tokenized (prompt
ids followed by response ids); `spans` are the [start, end) ranges of assistant tokens, the only
tokens that are loss targets (one span for a single-turn self-distilled answer). `split` is
"train" or "heldout": training reads only "train"; evaluation reads "heldout".

Labels: head k (0-based) at position t predicts token t+k+2, the base lm_head predicts t+1; a
label is kept only when its target token lies inside a span (else -100).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

SPLITS = ("train", "heldout")
IGNORE = -100
SPLIT_SALT = "medusa_vllm-heldout-v1"


class DataError(ValueError):
    """A data file line is malformed; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class Example:
    id: str
    split: str  # "train" | "heldout"
    input_ids: list[int]  # [T] chat-rendered prompt + response token ids
    spans: list[tuple[int, int]]  # assistant token ranges [start, end): the loss targets

    @property
    def prompt_ids(self) -> list[int]:
        """The tokens before the first assistant span (the prompt a generator would see)."""
        return self.input_ids[: self.spans[0][0]]

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "split": self.split, "input_ids": self.input_ids,
                           "spans": [list(s) for s in self.spans]}, separators=(",", ":"))


def split_of(key: str, heldout_fraction: float) -> str:
    """Deterministic split by a hash of `key` (e.g. the first user turn): the same prompt lands in
    the same split whatever the file order, the number of prompts or the machine."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie in [0, 1), got {heldout_fraction}")
    digest = hashlib.sha256(f"{SPLIT_SALT}\n{key}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction else "train"


def write_examples(path: str | Path, examples: Iterable[Example]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w") as f:
        for ex in examples:
            f.write(ex.to_json() + "\n")
            count += 1
    return count


def read_examples(path: str | Path, *, split: str | None = None,
                  vocab_size: int | None = None) -> list[Example]:
    """All records of `path` (or those of one split); every malformed line raises DataError."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            ex = _parse_record(line, f"{path}:{lineno}", vocab_size)
            if split is None or ex.split == split:
                out.append(ex)
    return out


def _parse_record(line: str, where: str, vocab_size: int | None) -> Example:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    missing = [k for k in ("id", "split", "input_ids", "spans") if k not in raw]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing} (a token-id record needs id, split, "
                        "input_ids, spans; chat conversations go through `python -m training.data convert`)")
    ids, spans = raw["input_ids"], raw["spans"]
    if raw["split"] not in SPLITS:
        raise DataError(f"{where}: split {raw['split']!r} is not one of {SPLITS}")
    if not isinstance(ids, list) or not ids or not all(type(t) is int and t >= 0 for t in ids):
        raise DataError(f"{where}: input_ids must be a non-empty list of non-negative ints")
    if vocab_size is not None and max(ids) >= vocab_size:
        raise DataError(f"{where}: token id {max(ids)} is outside the model's vocabulary ({vocab_size})")
    if not isinstance(spans, list) or not spans:
        raise DataError(f"{where}: spans must be a non-empty list of [start, end) pairs")
    prev_end = 0
    for s in spans:
        if (not isinstance(s, list) or len(s) != 2 or not all(type(x) is int for x in s)
                or not prev_end <= s[0] < s[1] <= len(ids)):
            raise DataError(f"{where}: span {s!r} must be [start, end) with {prev_end} <= start < end "
                            f"<= len(input_ids)={len(ids)}, spans sorted and disjoint")
        prev_end = s[1]
    return Example(str(raw["id"]), raw["split"], ids, [tuple(s) for s in spans])


def truncate(ex: Example, max_length: int) -> Example | None:
    """The first `max_length` tokens; None when no assistant token is left."""
    if len(ex.input_ids) <= max_length:
        return ex
    spans = [(a, min(b, max_length)) for a, b in ex.spans if a < max_length]
    if not spans:
        return None
    return Example(ex.id, ex.split, ex.input_ids[:max_length], spans)


def label_offsets(num_heads: int, with_base: bool) -> list[int]:
    """Token offset predicted by each label column: [1 (base),] 2, 3, ..., num_heads + 1."""
    return ([1] if with_base else []) + [k + 2 for k in range(num_heads)]


def make_labels(ex: Example, offsets: list[int]) -> Tensor:
    """labels [T, G] int64: column g holds input_ids[t + offsets[g]] where that token is an
    assistant token, else IGNORE."""
    ids = torch.tensor(ex.input_ids, dtype=torch.int64)  # [T]
    target = torch.zeros(len(ids), dtype=torch.bool)  # [T] token is a loss target
    for a, b in ex.spans:
        target[a:b] = True
    labels = torch.full((len(ids), len(offsets)), IGNORE, dtype=torch.int64)
    for g, o in enumerate(offsets):
        if o < len(ids):
            labels[: len(ids) - o, g] = torch.where(target[o:], ids[o:], IGNORE)
    return labels
