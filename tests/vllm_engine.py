"""Run a real vLLM engine in a fresh spawned process and bring back its outputs.

One process per engine keeps engines from sharing memory or global state (plugins, attention
backend overrides) and frees everything when it ends. Jobs are ``(prompts, sampling kwargs)``:
each job is one ``llm.generate`` call, so a job of N prompts runs at batch size up to N.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from dataclasses import dataclass, field

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
    outputs: list[list[list[int]]]  # [job][prompt] generated token ids
    texts: list[list[str]]
    metrics: dict[str, float] = field(default_factory=dict)
    medusa: dict | None = None


def _worker(conn, engine_kwargs: dict, jobs: list) -> None:
    try:
        from vllm import LLM, SamplingParams

        llm = LLM(**engine_kwargs)
        outputs, texts = [], []
        for prompts, sp in jobs:
            res = llm.generate(prompts, SamplingParams(**sp), use_tqdm=False)
            outputs.append([list(r.outputs[0].token_ids) for r in res])
            texts.append([r.outputs[0].text for r in res])
        metrics = {}
        for m in llm.get_metrics():
            if hasattr(m, "value"):
                metrics[m.name] = float(m.value)
            elif hasattr(m, "values"):
                for i, v in enumerate(m.values):
                    metrics[f"{m.name}[{i}]"] = float(v)
        conn.send(("ok", EngineResult(outputs, texts, metrics)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_engine(engine_kwargs: dict, jobs: list, timeout: float = 1800) -> EngineResult:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    env_before = os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    proc = ctx.Process(target=_worker, args=(child, engine_kwargs, jobs))
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise TimeoutError(f"vLLM engine did not finish within {timeout:.0f} s")
        status, payload = parent.recv()
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
        if env_before is None:
            os.environ.pop("VLLM_WORKER_MULTIPROC_METHOD", None)
    if status != "ok":
        raise RuntimeError(f"vLLM engine failed:\n{payload}")
    return payload


def spec_tau(metrics: dict[str, float]) -> float | None:
    drafts = metrics.get("vllm:spec_decode_num_drafts")
    accepted = metrics.get("vllm:spec_decode_num_accepted_tokens")
    if not drafts:
        return None
    return 1.0 + accepted / drafts
