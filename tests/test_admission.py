"""Admission groups (medusa_vllm.admission; speculative config admit_group / admit_wait): the
rule alone, its configuration, and a real vLLM CPU engine whose scheduler holds new requests while
others decode, with outputs unchanged."""

from __future__ import annotations

import pytest

from medusa_vllm.admission import AdmissionGroups
from medusa_vllm.vllm_plugin.config import MedusaConfigError, resolve

from tests.vllm_engine import CPU_ENGINE, run_engine


def test_holds_until_a_group_waits_or_the_oldest_waited_long_enough():
    a = AdmissionGroups(group=3, max_wait=4)
    waiting = [0, 1, 1, 2, 2, 2, 1, 0, 1, 3]
    assert [a.hold(step, w) for step, w in enumerate(waiting, start=1)] == [
        False,  # nobody waits
        True, True, True, True,  # one, then two wait: held since step 2
        False,  # step 6: the oldest waited 4 steps, released
        True,  # a new wait starts
        False,  # nobody waits: the wait ends
        True,
        False,  # three wait: a group
    ]


def test_group_of_one_is_vllms_way():
    a = AdmissionGroups()
    assert not any(a.hold(step, w) for step, w in enumerate([1, 2, 1, 5, 1], start=1))
    with pytest.raises(ValueError, match="must be >= 1"):
        AdmissionGroups(group=0)
    with pytest.raises(ValueError, match="must be >= 1"):
        AdmissionGroups(group=2, max_wait=0)


def test_config_takes_admission_from_the_spec_or_the_environment(bundled_model_dir, monkeypatch):
    from medusa_vllm.vllm_plugin.config import target_sizes

    model = str(bundled_model_dir)
    sizes = target_sizes(model)
    monkeypatch.delenv("MEDUSA_VLLM_ADMIT_GROUP", raising=False)
    monkeypatch.delenv("MEDUSA_VLLM_ADMIT_WAIT", raising=False)
    cfg = resolve({"method": "medusa_vllm", "tree": "sparse-15"}, model, *sizes)
    assert (cfg.admit_group, cfg.admit_wait) == (1, 8)
    cfg = resolve({"method": "medusa_vllm", "tree": "sparse-15", "admit_group": 4, "admit_wait": 6}, model, *sizes)
    assert (cfg.admit_group, cfg.admit_wait) == (4, 6)
    monkeypatch.setenv("MEDUSA_VLLM_ADMIT_GROUP", "3")  # a benchmark's "+MEDUSA_VLLM_ADMIT_GROUP=3"
    assert resolve({"method": "medusa_vllm", "tree": "sparse-15"}, model, *sizes).admit_group == 3
    for bad in (0, 2.5, "two", True):
        with pytest.raises(MedusaConfigError, match="admit_group .* must be integers >= 1"):
            resolve({"method": "medusa_vllm", "tree": "sparse-15", "admit_group": bad}, model, *sizes)


PROMPTS = ["The capital of France is", "List three colors:", "Count: one, two,", "Water boils at",
           "The opposite of hot is", "A haiku about rain:"]
MAX_TOKENS = 12


def steady(llm, prompts: list[str], concurrency: int) -> dict:
    """At most ``concurrency`` requests in flight, a finished one replaced at once (a server's
    queue), greedy; returns the outputs in order and the scheduler's admission stats."""
    from vllm import SamplingParams

    from medusa_vllm.vllm_plugin import adaptive_summary

    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    engine, todo, live, done = llm.llm_engine, list(enumerate(prompts)), 0, {}
    while todo or engine.has_unfinished_requests():
        while todo and live < concurrency:
            i, p = todo.pop(0)
            engine.add_request(f"r{i}", p, sp)
            live += 1
        for out in engine.step():
            if out.finished:
                done[int(out.request_id[1:])] = list(out.outputs[0].token_ids)
                live -= 1
    return {"outputs": [done[i] for i in range(len(prompts))], "summary": adaptive_summary(llm)}


@pytest.mark.vllm
def test_engine_holds_new_requests_and_outputs_stay_exact(bundled_model_dir):
    """Two requests decode at a time from a queue of six; with admit_group 3 a freed slot's new
    request waits (up to 3 steps) for company, through vLLM's own prefill deferral. Greedy
    outputs equal those of the same engine's closed batch (all admitted together) and of vLLM
    without speculation."""
    spec = {"method": "medusa_vllm", "model": "medusa_vllm", "tree": "sparse-15", "admit_group": 3,
            "admit_wait": 3}
    model = str(bundled_model_dir)
    jobs = [(steady, (PROMPTS, 2)), (PROMPTS, {"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True})]
    res = run_engine(dict(CPU_ENGINE, model=model, speculative_config=spec), jobs)
    plain = run_engine(dict(CPU_ENGINE, model=model), jobs[1:])
    held, closed = res.outputs
    assert held["outputs"] == closed == plain.outputs[0]
    adm = held["summary"]["admission"]
    assert adm["group"] == 3 and adm["max_wait"] == 3
    # each of the four refills waited for company: at least one held step each, at most 3
    assert 4 <= adm["held_steps"] <= 4 * 3 and adm["overridden"] >= 0, adm
