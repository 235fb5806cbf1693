"""Baseline vs Medusa in one run: output tokens/s, speed-up, τ and per-depth acceptance by batch size.

    python benchmarks/throughput.py                       # bundled model + heads, MT-Bench, this device
    python benchmarks/throughput.py --configs baseline medusa:default-63 --batch-sizes 1 8
    python benchmarks/throughput.py --tensor-parallel-size 2 --distributed-executor-backend ray

Configurations (each its own engine, one after the other, same machine):
  baseline          vLLM 0.26 without speculation (its default runner)
  baseline-v1async  the fastest plain configuration seen on the H100 (V1 runner, async scheduling)
  builtin           vLLM's built-in Medusa (top-1 chain of K heads), the same heads in its layout
  medusa:<tree>     medusa_vllm with a tree (preset, chain-N, or the heads' calibrated "calibrated")
  medusa-async:<tree>  the same under vLLM's asynchronous scheduler
  medusa-v2:<tree>  the same on vLLM's V2 model runner ("runner": "v2"; asynchronous scheduler,
                    GPU only; the faster runner on the H100: the GPU default below)
  adaptive          medusa_vllm with the load-adaptive tree (synchronous scheduling), measured
                    rule: per batch size the tree (or no drafts) with the most tokens/s by the
                    engine's own step times
  adaptive-async    the same under the asynchronous scheduler (vLLM's dynamic speculative
                    decoding reserves the policy's draft count per batch size)
  adaptive-budget   the load-adaptive tree with the token-budget rule (also -async)
  adaptive-v2, adaptive-budget-v2  the load-adaptive tree on vLLM's V2 model runner
                    (asynchronous scheduler, GPU only)
With ``--interleave`` every configuration's engine is alive at once (each in its own process,
its share of GPU memory) and per batch size they take turns round by round; each row then also
has ``speedup_paired``, the median of per-round ratios against the baseline's same round.
Each batch size b runs rounds of b requests (``ignore_eos``, fixed ``--max-tokens``), so b requests
decode together and the batch drains as they finish (a speculative batch over several steps: its
requests accept different lengths); ``--steady K`` makes a round K × b requests with at most b
decoding at a time, a finished request's slot refilled at once (what a server's queue does), so
the batch stays full but for each round's last requests; ``--length-spread F`` gives each request
its own output length (max-tokens × [1 − F, 1 + F], seeded by its place in the round, the same for
every configuration), so that without speculation too requests end, and are replaced, at
different steps, as a server's do. Measured after ``--warmup-rounds``
(default 1) unmeasured rounds of each batch size
(one-off compiles and the load-adaptive tree's first measurements stay out of the numbers; their
tokens/s are kept as ``warmup_round_tokens_per_s``); tokens/s is the median over the rounds (each round's rate is kept: the same
baseline moved by up to 2.4x between runs on one H200 when a round stalled); greedy outputs are compared token by token with ``baseline``, and each row keeps
a 12-digit digest per request (``output_digests``) to compare outputs across runs and files
(benchmarks/tp_check.py: TP=1 against TP=2). ``--sampling-json '{"repetition_penalty": 1.1}'``
adds SamplingParams to every request, e.g. a model's generation-config defaults as vLLM's server
applies them (penalties, allowed tokens and logprobs are speculated too).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    cpu_tp_env,
    device_tag,
    envelope,
    metric_values,
    output_digest,
    run_isolated,
    write_envelope,
    write_json,
)

MEDUSA_TREE_CONFIGS = ("medusa:", "medusa-async:", "medusa-v2:")  # medusa_vllm with a fixed tree
# with a GPU: medusa_vllm on vLLM's V2 runner (1.54x / 1.20x at batch 1 / 8 on the H100 against
# 1.07x / 0.85x on V1: README); on the CPU (V1 only) the same kinds of configuration
DEFAULT_CONFIGS = ["baseline", "builtin", "medusa-v2:chain-4", "medusa-v2:sparse-15",
                   "medusa-v2:sparse-31", "medusa-v2:default-63", "adaptive-v2"]


def config_env(name: str) -> tuple[str, dict]:
    """``"<config>+NAME=VALUE+..."`` -> (config, {NAME: VALUE, ...})."""
    config, *assigns = name.split("+")
    env = {}
    for assign in assigns:
        key, eq, value = assign.partition("=")
        if not eq or not key:
            raise SystemExit(f"configuration {name!r}: expected <config>+NAME=VALUE, got {assign!r}")
        env[key] = value
    return config, env


GPU_ATTENTION = {"triton": "TRITON_ATTN", "flash": "FLASH_ATTN"}  # --attention -> vLLM's backend name


def engine_kwargs(args, config: str, heads: str, builtin_heads: str | None) -> dict:
    import torch

    gpu = torch.cuda.is_available()
    kw = dict(model=args.model, max_model_len=args.max_model_len, seed=0, disable_log_stats=False,
              max_num_seqs=max(args.batch_sizes), **parallel_kwargs(args))
    if gpu:
        kw.update(dtype="bfloat16", gpu_memory_utilization=args.gpu_memory_utilization)
        if not config.startswith(("medusa", "adaptive")):
            # vLLM's own configurations: --attention (the GPU kit carries FlashAttention only when
            # tools/gpu/stage_fa3.sh staged it); medusa_vllm's parent backend follows it (engine_for)
            kw["attention_backend"] = GPU_ATTENTION[getattr(args, "attention", "triton")]
    else:
        kw.update(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2)
    if config == "builtin":
        kw["speculative_config"] = {"method": "medusa", "model": builtin_heads,
                                    "num_speculative_tokens": args.builtin_k}
    elif config.startswith(("medusa:", "adaptive")):
        spec = {"method": "medusa_vllm", "model": heads, "acceptance": args.acceptance}
        if config.startswith("adaptive"):
            spec.update(tree=args.adaptive_tree, adaptive=True,
                        adaptive_policy="budget" if config == "adaptive-budget" else "measured")
            if getattr(args, "adaptive_max_tokens", 0):
                spec["adaptive_max_tokens"] = args.adaptive_max_tokens
        elif config != "medusa:calibrated":
            spec["tree"] = config.split(":", 1)[1]
        kw["speculative_config"] = spec
    if "speculative_config" in kw:
        n = 64 if config.startswith("adaptive") or config in ("medusa:default-63", "medusa:calibrated") else 32
        kw["max_num_batched_tokens"] = max(2048, max(args.batch_sizes) * (n + 1))
    spec = kw.get("speculative_config", {})
    if gpu and spec.get("method") == "medusa_vllm":
        # CUDA graphs for the measured batch sizes: vLLM's default stops at 512 tokens, i.e. at
        # batch 8 for a 63-node tree (64 tokens per request); FULL graphs hold the tree step
        # the trees the engine will use, resolved as the plugin does (the calibrated tree stored
        # with the heads, the adaptive policy's trees); adaptive: also steps without drafts
        from medusa_vllm.vllm_plugin.config import resolve, target_sizes

        cfg = resolve(spec, args.model, *target_sizes(args.model))
        nodes = [len(t) for t in cfg.trees] + ([0] if cfg.adaptive else [])
        kw["compilation_config"] = {"cudagraph_capture_sizes": sorted(
            {(1 + n) * b for n in nodes for b in args.batch_sizes})}
    return kw


def engine_for(args, name: str, heads: str, builtin: str | None, gpu: bool) -> tuple[dict, dict]:
    """(engine keywords, environment) of configuration ``name``: "<config>+NAME=VALUE..." is
    the configuration with environment variables set (an A/B of one configuration under two
    settings, e.g. medusa-async:default-63+MEDUSA_VLLM_KV_MOVE=graph)."""
    config, env = config_env(name)
    env.update({"VLLM_USE_V2_MODEL_RUNNER": "0"} if config == "baseline-v1async" else {})
    if gpu and getattr(args, "attention", "triton") != "triton" and "MEDUSA_VLLM_PARENT_ATTENTION" not in env:
        env["MEDUSA_VLLM_PARENT_ATTENTION"] = args.attention  # prefill chunks beside the tree kernel
    if not gpu:
        env.update(cpu_tp_env(args.tensor_parallel_size))
        if getattr(args, "interleave", False) and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB per engine: several share the memory
    v2 = config.startswith("medusa-v2:") or (config.startswith("adaptive") and config.endswith("-v2"))
    kw = engine_kwargs(args, config.replace("-v1async", "").replace("medusa-async:", "medusa:")
                       .replace("medusa-v2:", "medusa:").removesuffix("-v2").removesuffix("-async"),
                       heads, builtin)
    if v2:
        kw["speculative_config"]["runner"] = "v2"
    if (config == "baseline-v1async" or config.endswith("-async") or v2
            or config.startswith("medusa-async:")):
        kw["async_scheduling"] = True
    return kw, env


def parallel_kwargs(args) -> dict:
    """--tensor-parallel-size and --distributed-executor-backend as engine arguments (none when
    left at their defaults: vLLM's own choice; step_cost.py's args have neither)."""
    kw = {}
    if getattr(args, "tensor_parallel_size", 1) > 1:
        kw["tensor_parallel_size"] = args.tensor_parallel_size
    if getattr(args, "distributed_executor_backend", None):
        kw["distributed_executor_backend"] = args.distributed_executor_backend
    return kw


def _spec_counts(m: dict) -> tuple[float, float, list[float]]:
    per_pos = [v for k, v in sorted(m.items()) if k.startswith("vllm:spec_decode_num_accepted_tokens_per_pos[")]
    return (m.get("vllm:spec_decode_num_drafts", 0.0),
            m.get("vllm:spec_decode_num_accepted_tokens", 0.0), per_pos)


class EngineBench:
    """One engine measured round by round: ``warmup``, then per batch size ``begin`` / ``round``
    (one round of b requests decoding together) / ``end`` (the row), and ``finish``. Lives in its
    own process (:func:`measure` runs it whole; ``--interleave`` calls it through
    ``benchmarks.common.Isolated``, one per configuration, taking turns)."""

    def __init__(self, kw: dict, prompts: list[str], max_tokens: int, sampling: dict,
                 length_spread: float = 0.0) -> None:
        from vllm import LLM

        t0 = time.perf_counter()
        self.llm = LLM(**kw)
        self.engine_start_s = time.perf_counter() - t0
        self.kw, self.prompts, self.sampling = kw, prompts, sampling  # SamplingParams keywords
        self.sp = self._sampling_params(max_tokens)
        self.length_spread = length_spread
        self._by_length: dict[int, object] = {}  # max_tokens -> SamplingParams (--length-spread)
        self._acc: dict | None = None
        self._warm: dict[int, list[float]] = {}  # batch size -> warm-up rounds' tokens/s
        self._next_id = 0

    def warmup(self, batch_sizes: list[int], rounds: int = 0, steady: int = 0, queue: bool = False) -> None:
        """Every measured batch size once, 8 tokens (first-use allocations, kernels), then
        ``rounds`` whole rounds of it (the measured requests and sampling), not measured: what a
        server has behind it after its first minutes. On a fresh H100 the first rounds held
        one-off host stalls of 0.4-0.5 s inside vLLM's forward and input preparation, and the
        load-adaptive tree measures its candidate trees (step_log_h100_fa59925.json); their
        tokens/s stay in the row (``warmup_round_tokens_per_s``)."""
        from vllm import SamplingParams

        for b in sorted(set(batch_sizes)):
            self.llm.generate(requests_for(self.prompts, b),
                              SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
        for b in batch_sizes:
            for _ in range(rounds):
                s = time.perf_counter()
                res, _ = self._decode(requests_for(self.prompts, round_size(b, steady)), b, queue)
                tokens = sum(len(o.outputs[0].token_ids) for o in res)
                self._warm.setdefault(b, []).append(tokens / (time.perf_counter() - s))

    def params(self, i: int):
        """SamplingParams of a round's i-th request: ``self.sp``, with ``--length-spread`` its
        own output length (:func:`request_max_tokens`)."""
        if not self.length_spread:
            return self.sp
        n = request_max_tokens(i, self.sp.max_tokens, self.length_spread)
        if n not in self._by_length:
            self._by_length[n] = self._sampling_params(n)
        return self._by_length[n]

    def _sampling_params(self, max_tokens: int):
        """Every measured request's SamplingParams (``self.sampling``), for ``max_tokens`` tokens."""
        from vllm import SamplingParams

        return SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=0, **self.sampling)

    def _decode(self, chunk: list[str], concurrency: int, queue: bool = False) -> tuple[list, list[float]]:
        """``chunk`` decoded at most ``concurrency`` requests at a time: the outputs in order and
        each request's seconds from its admission to its end. With the whole chunk at once it is
        ``LLM.generate`` (a closed round); with more requests than that, a finished request's
        slot goes to the next one at once, as a server's queue refills its batch. ``queue``
        (``--queue``): the whole chunk submitted at once to an engine of ``max_num_seqs``
        ``concurrency``, vLLM's scheduler holding the rest in its own queue as a busy server's
        does; each request's seconds then run from its submission."""
        if queue:
            concurrency = len(chunk)
        elif len(chunk) <= concurrency:
            s = time.perf_counter()
            res = self.llm.generate(chunk, [self.params(i) for i in range(len(chunk))], use_tqdm=False)
            return res, [time.perf_counter() - s] * len(res)
        engine, todo = self.llm.llm_engine, list(enumerate(chunk))
        admitted: dict[str, tuple[int, float]] = {}  # request id -> (index in chunk, admission)
        done: dict[int, tuple[object, float]] = {}
        while todo or engine.has_unfinished_requests():
            while todo and len(admitted) - len(done) < concurrency:
                i, prompt = todo.pop(0)
                rid = f"steady-{self._next_id}"  # outputs carry it (add_request returns vLLM's own id)
                engine.add_request(rid, prompt, self.params(i))
                self._next_id += 1
                admitted[rid] = (i, time.perf_counter())
            for out in engine.step():
                if out.finished:
                    i, t0 = admitted[out.request_id]
                    done[i] = (out, time.perf_counter() - t0)
        return [done[i][0] for i in range(len(chunk))], [done[i][1] for i in range(len(chunk))]

    def begin(self, b: int) -> None:
        self._acc = {"b": b, "before": _spec_counts(metric_values(self.llm)), "tokens": 0,
                     "tpot": [], "elapsed": 0.0, "outputs": [], "rates": []}

    def round(self, chunk: list[str], concurrency: int | None = None, queue: bool = False) -> float:
        """One round: ``chunk`` decoded at most ``concurrency`` (default: all of them) requests
        at a time (``queue``: all submitted at once to an engine that runs that many,
        :meth:`_decode`); returns its output tokens/s."""
        acc = self._acc
        s = time.perf_counter()
        res, latencies = self._decode(chunk, concurrency or len(chunk), queue)
        dt = time.perf_counter() - s
        acc["elapsed"] += dt
        round_tokens = 0
        for o, latency in zip(res, latencies):
            k = len(o.outputs[0].token_ids)
            round_tokens += k
            acc["tpot"].append(latency / max(k, 1))
            acc["outputs"].append(list(o.outputs[0].token_ids))
        acc["tokens"] += round_tokens
        acc["rates"].append(round_tokens / dt)
        return round_tokens / dt

    def end(self) -> dict:
        acc, self._acc = self._acc, None
        before, after = acc["before"], _spec_counts(metric_values(self.llm))
        drafts, accepted = after[0] - before[0], after[1] - before[1]
        per_pos = [a - (before[2][i] if i < len(before[2]) else 0) for i, a in enumerate(after[2])]
        tpot = sorted(acc["tpot"])
        rates = acc["rates"]
        return {
            "batch_size": acc["b"], "requests": len(acc["outputs"]), "output_tokens": acc["tokens"],
            "seconds": acc["elapsed"],
            # the median round: one stalled round (seen on shared GPU machines) does not set it
            "tokens_per_s": statistics.median(rates),
            "tokens_per_s_overall": acc["tokens"] / acc["elapsed"],
            "round_tokens_per_s": rates,
            "warmup_round_tokens_per_s": self._warm.get(acc["b"], []),
            "tpot_ms_median": 1000 * statistics.median(tpot),
            "tpot_ms_p90": 1000 * tpot[min(len(tpot) - 1, int(0.9 * len(tpot)))],
            "tau": (1 + accepted / drafts) if drafts else None,
            "acceptance_per_depth": [p / drafts for p in per_pos if p > 0] if drafts else None,
            "outputs": acc["outputs"],
        }

    def stats(self) -> dict:
        """medusa_vllm's stats so far (did uniform greedy steps replay the verify+heads CUDA
        graphs? the adaptive rule's table) and the engine's start time."""
        llm = self.llm
        spec = self.kw.get("speculative_config") or {}
        medusa = llm.collective_rpc("medusa_stats")[0] if spec.get("method") == "medusa_vllm" else None
        if medusa is not None:
            from medusa_vllm.vllm_plugin import adaptive_summary

            # the measured rule's table: ms per step by batch bucket and draft count, τ per tree;
            # admission groups (the plugin's choice on a GPU unless given): the steps that
            # deferred new prefills
            resolved = llm.llm_engine.vllm_config.additional_config["medusa_vllm"]
            admission = resolved["admit_group"] > 1
            summary = (adaptive_summary(llm) or {}) if spec.get("adaptive") or admission else {}
            if "admission" in summary:
                medusa["admission"] = summary.pop("admission")
            if spec.get("adaptive"):
                medusa["adaptive"] = summary or None
        return {"engine_start_s": self.engine_start_s, "medusa_stats": medusa}

    def finish(self, profile_batch_sizes: tuple[int, ...] = ()) -> dict:
        """:meth:`stats` and one profiled round (32 tokens) per ``profile_batch_sizes``
        (medusa_vllm.profiling; needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 and
        VLLM_CUSTOM_SCOPES_FOR_PROFILING=1)."""
        from vllm import SamplingParams

        from medusa_vllm.profiling import start_profile, stop_profile

        llm = self.llm
        profiles = {}
        for b in profile_batch_sizes:
            llm.collective_rpc(start_profile)
            llm.generate(requests_for(self.prompts, b),
                         SamplingParams(max_tokens=32, ignore_eos=True, seed=0, **self.sampling),
                         use_tqdm=False)
            profiles[b] = llm.collective_rpc(stop_profile)[0]
        return self.stats() | {"profiles": profiles}


def sampling_of(args) -> dict:
    """SamplingParams keywords of every measured request: --temperature and --sampling-json."""
    extra = json.loads(args.sampling_json) if getattr(args, "sampling_json", None) else {}
    if not isinstance(extra, dict) or {"max_tokens", "ignore_eos", "seed"} & set(extra):
        raise SystemExit(f"--sampling-json: a JSON object of SamplingParams keywords other than "
                         f"max_tokens, ignore_eos and seed, got {args.sampling_json!r}")
    return {"temperature": args.temperature, **extra}


def tool_args(model: str, batch_sizes: list[int], temperature: float = 0.0,
              attention: str = "triton") -> argparse.Namespace:
    """This benchmark's arguments as the GPU tools that replay its rounds build their engines
    and requests (tools/gpu/step_log.py, tools/gpu/mixed_profile.py): its defaults, greedy
    unless ``temperature`` (:func:`sampling_of`)."""
    return argparse.Namespace(model=model, batch_sizes=batch_sizes, max_model_len=2048, gpu_memory_utilization=0.3,
                              acceptance="rejection", adaptive_tree="default-63", adaptive_max_tokens=0,
                              builtin_k=4, num_prompts=80, tensor_parallel_size=1,
                              distributed_executor_backend=None, temperature=temperature, sampling_json=None,
                              attention=attention)


def add_tool_arguments(ap: argparse.ArgumentParser) -> None:
    """--temperature and --attention of the GPU tools that replay this benchmark's rounds, as
    :func:`tool_args` takes them (before 2026-12-06 tools/gpu/step_log.py sampled at vLLM's
    default temperature, 1.0)."""
    ap.add_argument("--temperature", type=float, default=0.0, help="of every request (default: greedy)")
    ap.add_argument("--attention", default="triton", choices=sorted(GPU_ATTENTION),
                    help="throughput.py --attention: vLLM's backend and medusa_vllm's parent backend")


def requests_for(prompts: list[str], n: int) -> list[str]:
    return [prompts[i % len(prompts)] for i in range(n)]


def request_max_tokens(i: int, max_tokens: int, spread: float) -> int:
    """Output length of a round's i-th request: ``max_tokens``, or with ``--length-spread F``
    one drawn uniformly from max_tokens x [1 - F, 1 + F], seeded by i (every configuration and
    round gets the same lengths): requests then end at different steps without speculation too,
    as a server's do (with one length, a plain batch ends all at once and refills in one step)."""
    if not spread:
        return max_tokens
    u = random.Random(i).random()
    return max(1, round(max_tokens * (1 + spread * (2 * u - 1))))


def round_size(b: int, steady: int) -> int:
    """Requests in a round of batch size ``b``: b (closed rounds), or K × b with ``--steady K``."""
    return b * max(steady, 1)


def measure(kw: dict, prompts: list[str], batch_sizes: list[int], max_tokens: int,
            sampling: dict, prompts_per_batch: dict[int, int],
            profile_batch_sizes: tuple[int, ...] = (), warmup_rounds: int = 0, steady: int = 0,
            length_spread: float = 0.0, queue: bool = False) -> dict:
    """Runs in its own process: one engine, every batch size, round after round (``steady``
    K > 0: rounds of K × b requests, b at a time; ``queue``: all at once, see ``EngineBench._decode``)."""
    bench = EngineBench(kw, prompts, max_tokens, sampling, length_spread)
    bench.warmup(batch_sizes, warmup_rounds, steady, queue)
    rows = []
    for b in batch_sizes:
        todo = requests_for(prompts, prompts_per_batch[b])
        bench.begin(b)
        size = round_size(b, steady)
        for r in range(0, len(todo), size):
            bench.round(todo[r : r + size], b, queue)
        rows.append(bench.end())
    return {"rows": rows, **bench.finish(profile_batch_sizes)}


def measure_interleaved(engines: dict[str, tuple[dict, dict]], prompts: list[str], args,
                        per_batch: dict[int, int], on_batch=None, bench_cls: type | None = None) -> dict:
    """Every configuration's engine alive at once (``engines``: config -> (engine kwargs, env)),
    each in its own process; per batch size the configurations take turns round by round, the
    order rotating each round, so a drift of the machine touches all of them alike. Results as
    :func:`measure`'s, per configuration; ``on_batch(results)`` after each batch size."""
    from tqdm import tqdm

    from benchmarks.common import Isolated

    results: dict[str, dict] = {}
    live: dict[str, Isolated] = {}
    sampling = sampling_of(args)

    def fail(config: str, e: Exception) -> None:
        print(f"[{config}] failed: {e}", file=sys.stderr)
        results[config] = {"engine_start_s": None, "rows": results.get(config, {}).get("rows", []),
                           "error": str(e)[-2000:]}
        bench = live.pop(config, None)
        if bench is not None:
            bench.close()

    def each(method: str, *margs, configs=None) -> dict:
        out = {}
        for c in list(configs or live):
            if c in live:
                try:
                    out[c] = live[c].call(method, *margs)
                except Exception as e:  # noqa: BLE001 - one failing configuration is recorded
                    fail(c, e)
        return out

    try:
        for config, (kw, env) in tqdm(engines.items(), desc="engines"):  # one start at a time
            try:
                live[config] = Isolated(bench_cls or EngineBench, kw, prompts, args.max_tokens,
                                        sampling, getattr(args, "length_spread", 0.0), env=env)
                results[config] = {"engine_start_s": None, "rows": []}
            except Exception as e:  # noqa: BLE001
                fail(config, e)
        steady, queue = getattr(args, "steady", 0), getattr(args, "queue", False)
        each("warmup", args.batch_sizes, getattr(args, "warmup_rounds", 0), steady, queue)
        for b in tqdm(args.batch_sizes, desc="batch sizes"):
            todo = requests_for(prompts, per_batch[b])
            each("begin", b)
            order, size = list(live), round_size(b, steady)
            for i, r in enumerate(range(0, len(todo), size)):
                k = i % max(len(order), 1)
                each("round", todo[r : r + size], b, queue, configs=order[k:] + order[:k])
            for c, row in each("end").items():
                results[c]["rows"].append(row)
            for c, extra in each("stats").items():  # so far: a run cut off later keeps them
                results[c].update(extra)
            if on_batch is not None:
                on_batch(results)
        for c, extra in each("finish").items():
            results[c].update(extra)
    finally:
        for bench in live.values():
            bench.close()
    return results


def prompts_for(args) -> list[str]:
    from transformers import AutoTokenizer

    from medusa_vllm.prompts import chat, mt_bench_questions

    tok = AutoTokenizer.from_pretrained(args.model)
    return chat(tok, mt_bench_questions()[: args.num_prompts])


def builtin_layout(heads: str, model: str, out_dir: Path) -> str:
    """The same heads in the layout vLLM's built-in Medusa loads."""
    from medusa_vllm.checkpoint import convert_heads, load_heads, load_lm_head_weight

    dst = out_dir / "heads_vllm_layout"
    if not (dst / "config.json").exists():
        h = load_heads(heads)
        lm = None if h.config.own_lm_heads else load_lm_head_weight(model)
        convert_heads(heads, dst, "vllm", lm_head_weight=lm)
    return str(dst)


def paired_ratios(row: dict, base: dict | None) -> list[float] | None:
    """Per round, this round's tokens/s over the baseline's same round (None: rounds unpaired).
    With interleaved engines each pair ran back to back, so drift between rounds cancels in
    their median (``speedup_paired``); their spread is the run's noise."""
    a, b = row.get("round_tokens_per_s") or [], (base or {}).get("round_tokens_per_s") or []
    if not a or len(a) != len(b):
        return None
    return [x / y for x, y in zip(a, b)]


def summarize(results: dict, args) -> tuple[list, dict]:
    base = {r["batch_size"]: r for r in results.get("baseline", {}).get("rows", [])}
    interleaved = bool(getattr(args, "interleave", False))
    rows, identical = [], []
    for config, res in results.items():
        for r in res["rows"]:
            b0 = base.get(r["batch_size"])
            ratios = paired_ratios(r, b0) if interleaved else None
            same = None
            if b0 is not None and args.temperature == 0 and config != "baseline":
                same = sum(x == y for x, y in zip(r["outputs"], b0["outputs"]))
                identical.append(same == len(r["outputs"]))
            rows.append({
                "config": config, **{k: v for k, v in r.items() if k != "outputs"},
                "speedup": r["tokens_per_s"] / b0["tokens_per_s"] if b0 else None,
                "speedup_paired": statistics.median(ratios) if ratios else None,
                # every round's ratio: their spread is the run's noise (H200, 2026-12-05: one
                # configuration's rounds ranged 0.85-1.34x at one batch size)
                "speedup_paired_rounds": [round(x, 4) for x in ratios or []] if interleaved else None,
                "greedy_identical_requests": same,
                "engine_start_s": res["engine_start_s"],
                "output_digests": [output_digest(o) for o in r["outputs"]],  # compare across runs
            })

    stats = {c: r["medusa_stats"] for c, r in results.items() if r.get("medusa_stats")}
    return rows, headline(rows, interleaved, identical, stats)


def headline(rows: list[dict], interleaved: bool, identical: list[bool], medusa_stats: dict) -> dict:
    """The issue's summary keys from result rows (each row's speedups against its own run's
    baseline); ``identical``: per greedy configuration and batch size, all outputs identical."""

    def best(b: int, pick=lambda c: c.startswith(MEDUSA_TREE_CONFIGS)) -> float | None:
        xs = [r["speedup"] for r in rows if r["batch_size"] == b and pick(r["config"]) and r["speedup"]]
        return max(xs) if xs else None

    tau1 = [r["tau"] for r in rows
            if r["batch_size"] == 1 and r["config"].startswith(MEDUSA_TREE_CONFIGS) and r["tau"]]
    configs = [c for c in dict.fromkeys(r["config"] for r in rows) if not c.startswith("baseline")]
    return {
        "speedup_bs1": best(1), "speedup_bs8": best(8), "speedup_bs32": best(32),
        "speedup_bs64": best(64, lambda c: c.startswith("adaptive")),
        # the load-adaptive tree at every batch size (the keys above: fixed trees, bs 64 aside)
        "speedup_adaptive": {b: x for b in sorted({r["batch_size"] for r in rows})
                             if (x := best(b, lambda c: c.startswith("adaptive")))},
        "speedup_builtin_medusa_bs1": best(1, lambda c: c.split("#")[0] == "builtin"),
        "interleaved": interleaved,
        # interleaved runs: per configuration and batch size, the median per-round ratio
        "speedup_paired": {c: {r["batch_size"]: r["speedup_paired"] for r in rows
                               if r["config"] == c and r.get("speedup_paired")}
                           for c in configs} if interleaved else None,
        "tau_bs1": max(tau1) if tau1 else None,
        "greedy_identical": all(identical) if identical else None,
        "device": None,
        # per medusa_vllm config: tree steps, τ, and how many uniform greedy steps replayed the
        # verify+heads CUDA graphs (graph_batch_sizes: the sizes captured)
        "medusa_stats": medusa_stats,
    }


# what must agree between runs that --merge puts in one result
MERGE_SAME = ("model", "heads", "max_tokens", "temperature", "sampling_json", "num_prompts", "acceptance",
              "max_model_len", "interleave", "steady", "length_spread", "attention", "queue")
# what a run from before the option ran
MERGE_DEFAULTS = {"steady": 0, "length_spread": 0.0, "attention": "triton", "queue": False}


def merge(paths: list[str], out: Path) -> tuple[list, dict]:
    """One result from several runs of this script on one machine (a GPU call of 10 minutes
    holds three or four engines, not all the configurations): each run's rows keep their
    speedups against that run's own baseline; a configuration in several runs is named
    ``config#run`` (run = its place in ``paths``, from 1); the summary is recomputed."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    for key in ("device", *(f"config.{k}" for k in MERGE_SAME)):
        name = key.split(".", 1)[-1]
        seen = {json.dumps(r[key] if key == "device" else r["config"].get(name, MERGE_DEFAULTS.get(name)))
                for r in runs}
        if len(seen) > 1:
            raise SystemExit(f"throughput.py --merge: the runs differ in {key} ({', '.join(sorted(seen))}); "
                             f"merge only runs of one machine and one set-up")
    count = Counter(c for r in runs for c in {x["config"] for x in r["rows"]})
    rows, identical, stats = [], [], {}
    for i, run in enumerate(runs, start=1):
        for r in run["rows"]:
            name = r["config"] if count[r["config"]] == 1 else f"{r['config']}#{i}"
            rows.append({**r, "config": name})
            if r.get("greedy_identical_requests") is not None:
                identical.append(r["greedy_identical_requests"] == r["requests"])
        for c, st in (run["summary"].get("medusa_stats") or {}).items():
            stats[c if count[c] == 1 else f"{c}#{i}"] = st
    interleaved = all(r["summary"].get("interleaved") for r in runs)
    summary = headline(rows, interleaved, identical, stats)
    summary["device"] = runs[0]["device"]
    summary["cuda_graphs"] = all(r["summary"].get("cuda_graphs") for r in runs)
    config = {k: runs[0]["config"].get(k) for k in MERGE_SAME} | {
        "merged_from": [{"file": Path(p).name, "command": r["command"], "git_commit": r["git_commit"],
                         "created": r["created"]} for p, r in zip(paths, runs)]}
    write_json(out, envelope("throughput", device=runs[0]["device"], config=config, rows=rows, summary=summary))
    return rows, summary


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for config in dict.fromkeys(r["config"] for r in rows):
        pts = [(r["batch_size"], r["speedup"]) for r in rows if r["config"] == config and r["speedup"]]
        if pts:
            ax1.plot(*zip(*pts), marker="o", label=config)
        taus = [(r["batch_size"], r["tau"]) for r in rows if r["config"] == config and r["tau"]]
        if taus:
            ax2.plot(*zip(*taus), marker="o", label=config)
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.set(xscale="log", xlabel="batch size", ylabel="output tokens/s ÷ no speculation",
            title="speed-up over vLLM without speculation")
    ax2.set(xscale="log", xlabel="batch size", ylabel="τ (tokens per verification step)",
            title="mean accepted length")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: bundled SmolLM2-135M)")
    ap.add_argument("--heads", default=None, help="heads checkpoint (default: bundled heads)")
    ap.add_argument("--configs", nargs="+", default=None)
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--sampling-json", default=None,
                    help='more SamplingParams of every request, e.g. \'{"repetition_penalty": 1.1}\' '
                         "(a model's generation-config defaults, as vLLM's server applies them)")
    ap.add_argument("--num-prompts", type=int, default=80)
    ap.add_argument("--acceptance", default="rejection", choices=["rejection", "typical"])
    ap.add_argument("--adaptive-tree", default="default-63")
    ap.add_argument("--adaptive-max-tokens", type=int, default=0,
                    help="token budget of the adaptive budget rule (0: the device default)")
    ap.add_argument("--builtin-k", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds of b requests per batch size b (tokens/s: the median round)")
    ap.add_argument("--steady", type=int, default=0, metavar="K",
                    help="rounds of K x b requests, at most b decoding at a time (a finished request's "
                         "slot refilled at once, as a server's queue does): the batch stays full but "
                         "for the round's last requests. 0 (default): closed rounds of b requests, "
                         "which drain as their requests finish")
    ap.add_argument("--attention", default="triton", choices=sorted(GPU_ATTENTION),
                    help="GPU: vLLM's attention backend for the configurations without medusa_vllm, and "
                         "medusa_vllm's backend beside its tree kernel (prefill chunks): triton "
                         "(TRITON_ATTN, default: the GPU kit's) or flash (FLASH_ATTN: FlashAttention 3, "
                         "vLLM's own choice on an H100; the kit carries it after tools/gpu/stage_fa3.sh)")
    ap.add_argument("--queue", action="store_true",
                    help="with --steady K and one batch size b: each round's K x b requests submitted at "
                         "once to engines of max_num_seqs b, vLLM's scheduler holding the rest in its "
                         "queue (a busy server; without it the benchmark refills a freed slot itself). "
                         "The time per output token then counts from submission: it holds the wait")
    ap.add_argument("--length-spread", type=float, default=0.0, metavar="F",
                    help="each request's output length drawn from max-tokens x [1-F, 1+F] (seeded by its "
                         "place in the round: the same for every configuration), so requests end at "
                         "different steps without speculation too, as a server's do; 0 (default): all "
                         "--max-tokens")
    ap.add_argument("--warmup-rounds", type=int, default=1,
                    help="whole rounds per batch size and configuration run before the measured "
                         "ones (their tokens/s kept in the rows as warmup_round_tokens_per_s)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="vLLM tensor parallelism (every configuration; medusa_vllm replicates its heads)")
    ap.add_argument("--distributed-executor-backend", default=None, choices=["mp", "ray"],
                    help="vLLM's executor for TP > 1 (default: vLLM's choice, mp on one machine)")
    ap.add_argument("--interleave", action="store_true",
                    help="every configuration's engine alive at once, taking turns round by round "
                         "(speedup_paired: the median of per-round ratios against the baseline)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/throughput_<dev>.json)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="write one result (--out, and its PNG) from these earlier runs on one machine: "
                         "each run's rows against its own baseline, the summary recomputed")
    args = ap.parse_args(argv)
    if args.merge:
        if not args.out:
            ap.error("--merge needs --out (the merged result's path)")
        out = Path(args.out)
        rows, summary = merge(args.merge, out)
        _print_table(rows, summary)
        _plot_or_say(rows, out)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from medusa_vllm.bundled import bundled_heads_path, bundled_model_path

    gpu = torch.cuda.is_available()
    args.model = args.model or str(bundled_model_path())
    heads = args.heads or (str(bundled_heads_path()) if bundled_heads_path() else None)
    if heads is None:
        sys.exit("no heads: pass --heads (the bundled heads are missing from this install)")
    sampling = sampling_of(args)  # a bad --sampling-json stops here, before any engine starts
    if args.warmup_rounds < 0:
        sys.exit(f"--warmup-rounds {args.warmup_rounds}: give 0 (no warm-up rounds) or more")
    if args.steady < 0:
        sys.exit(f"--steady {args.steady}: give 0 (closed rounds of b requests) or K > 0 (rounds of K x b)")
    if args.queue and (args.steady < 2 or len(args.batch_sizes or []) != 1):
        sys.exit("--queue: give --steady K (K >= 2) and one --batch-sizes b (the engines' max_num_seqs "
                 "is b, so each batch size needs engines of its own: one run per batch size)")
    if not 0 <= args.length_spread < 1:
        sys.exit(f"--length-spread {args.length_spread}: give F in [0, 1) (lengths max-tokens x [1-F, 1+F])")
    args.batch_sizes = args.batch_sizes or ([1, 2, 4, 8, 16, 32, 64] if gpu else [1, 4, 16])
    args.configs = args.configs or (DEFAULT_CONFIGS if gpu else
                                    ["baseline", "builtin", "medusa:chain-4", "medusa:sparse-15", "adaptive"])
    if "baseline" not in args.configs:
        args.configs.insert(0, "baseline")
    out = Path(args.out) if args.out else RESULTS / f"throughput_{device_tag()}.json"
    prompts = prompts_for(args)
    per_batch = {b: (round_size(b, args.steady) * args.rounds if args.steady
                     else min(len(prompts) * 4, b * args.rounds)) for b in args.batch_sizes}
    builtin = builtin_layout(heads, args.model, out.parent / ".work") if "builtin" in args.configs else None

    from tqdm import tqdm

    if args.interleave:  # the engines share the device: each gets its part of the memory
        args.gpu_memory_utilization = min(args.gpu_memory_utilization, 0.9 / len(args.configs))
    engines = {name: engine_for(args, name, heads, builtin, gpu) for name in args.configs}

    if args.interleave:
        results = measure_interleaved(engines, prompts, args, per_batch,
                                      on_batch=lambda res: save(res, args, heads, out, gpu))
        for config, res in results.items():
            _print_rows(config, res["rows"])
    else:
        results = {}
        for config in tqdm(args.configs, desc="configurations"):
            kw, env = engines[config]
            try:
                results[config] = run_isolated(measure, kw, prompts, args.batch_sizes, args.max_tokens,
                                               sampling, per_batch, (), args.warmup_rounds, args.steady,
                                               args.length_spread, args.queue, env=env)
            except Exception as e:  # noqa: BLE001 - one failing configuration is recorded, not fatal
                print(f"[{config}] failed: {e}", file=sys.stderr)
                results[config] = {"engine_start_s": None, "rows": [], "error": str(e)[-2000:]}
            _print_rows(config, results[config]["rows"])
            save(results, args, heads, out, gpu)  # after every configuration: a cut-off run keeps its rows
    rows, summary = save(results, args, heads, out, gpu)
    _plot_or_say(rows, out)
    _print_table(rows, summary)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _plot_or_say(rows: list[dict], out: Path) -> None:
    try:
        plot(rows, out.with_suffix(".png"))
    except ImportError as e:  # the GPU box has no matplotlib: the JSON is the result
        print(f"no plot ({e}); the numbers are in {out}", file=sys.stderr)


def _print_table(rows: list[dict], summary: dict) -> None:
    print(f"\n{'config':>22} {'bs':>4} {'tok/s':>9} {'speedup':>8} {'tau':>5}")
    for r in rows:
        sp = f"{r['speedup']:.2f}" if r["speedup"] else "-"
        tau = f"{r['tau']:.2f}" if r["tau"] else "-"
        print(f"{r['config']:>22} {r['batch_size']:>4} {r['tokens_per_s']:9.1f} {sp:>8} {tau:>5}")
    print("summary:", summary)


def _print_rows(config: str, rows: list[dict]) -> None:
    for r in rows:
        tau = f"{r['tau']:.2f}" if r["tau"] else "-"
        print(f"{config:>22} bs={r['batch_size']:>3} {r['tokens_per_s']:9.1f} tok/s  tau={tau}")


def save(results: dict, args, heads: str, out: Path, gpu: bool) -> tuple[list, dict]:
    from benchmarks.common import device_name

    rows, summary = summarize(results, args)
    summary["device"] = device_name()
    summary["cuda_graphs"] = bool(gpu)
    errors = {c: r["error"] for c, r in results.items() if r.get("error")}
    config = {k: v for k, v in vars(args).items()} | {"heads": heads, "errors": errors,
                                                       "prompts": "MT-Bench first turns, chat template"}
    write_envelope(out, "throughput", config, rows, summary)
    return rows, summary


if __name__ == "__main__":
    main()
