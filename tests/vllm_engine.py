"""Run a real vLLM engine in a fresh spawned process and bring back its outputs.

One process per engine keeps engines from sharing memory or global state (plugins, attention
backend overrides) and frees everything when it ends. A job is either ``(prompts, sampling
kwargs)`` — one ``llm.generate`` call, so a job of N prompts runs at batch size up to N — or
``(callable, args)`` where the module-level callable gets ``(llm, *args)`` and returns anything
picklable (for step-level scenarios: aborts, streaming).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from dataclasses import dataclass, field

from benchmarks.common import metric_values

CPU_ENGINE = dict(
    dtype="float32",  # fp32: multi-token verification queries and single-token decode agree
    max_model_len=1024,
    max_num_seqs=16,
    max_num_batched_tokens=1024,
    enforce_eager=True,
    gpu_memory_utilization=0.15,
    seed=0,
    disable_log_stats=False,
)


@dataclass
class EngineResult:
    outputs: list  # per job: [prompt][token ids] for generate jobs, the callable's result otherwise
    texts: list
    metrics: dict[str, float] = field(default_factory=dict)


def _worker(conn, engine_kwargs: dict, jobs: list) -> None:
    try:
        from vllm import LLM, SamplingParams

        llm = LLM(**engine_kwargs)
        outputs, texts = [], []
        for what, arg in jobs:
            if callable(what):
                outputs.append(what(llm, *arg))
                texts.append(None)
                continue
            sp = [SamplingParams(**a) for a in arg] if isinstance(arg, list) else SamplingParams(**arg)
            res = llm.generate(what, sp, use_tqdm=False)
            outputs.append([list(r.outputs[0].token_ids) for r in res])
            texts.append([r.outputs[0].text for r in res])
        conn.send(("ok", EngineResult(outputs, texts, metric_values(llm))))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_engine(engine_kwargs: dict, jobs: list, timeout: float = 1800,
               env: dict[str, str] | None = None) -> EngineResult:
    """Runs ``jobs`` on a fresh engine in a spawned process (``env``: extra environment for it)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    env = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn", **(env or {})}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    proc = ctx.Process(target=_worker, args=(child, engine_kwargs, jobs))
    proc.start()
    child.close()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        if not parent.poll(timeout):
            raise TimeoutError(f"vLLM engine did not finish within {timeout:.0f} s")
        status, payload = parent.recv()
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
    if status != "ok":
        raise RuntimeError(f"vLLM engine failed:\n{payload}")
    return payload


def spec_tau(metrics: dict[str, float]) -> float | None:
    drafts = metrics.get("vllm:spec_decode_num_drafts")
    accepted = metrics.get("vllm:spec_decode_num_accepted_tokens")
    if not drafts:
        return None
    return 1.0 + accepted / drafts
