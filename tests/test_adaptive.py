"""The load-adaptive tree policy and the draft-count schedule it hands to vLLM."""

from __future__ import annotations

from collections import deque

import pytest

from medusa_vllm.adaptive import NO_TREE, AdaptiveTreePolicy
from medusa_vllm.tree import TokenTree, get_tree

TREES = [get_tree("default-63"), get_tree("sparse-15"), TokenTree.chain(3)]


def policy(budget: int = 512) -> AdaptiveTreePolicy:
    return AdaptiveTreePolicy(TREES, True, budget, "cuda")


def _tool(name: str):
    """tools/<name>.py as a module (the tools are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / f"tools/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_largest_tree_that_fits_the_budget_then_none():
    p = policy(512)
    assert [p.choose(b) for b in (1, 8, 9, 32, 128, 129)] == [0, 0, 1, 1, 2, NO_TREE]
    assert [p.num_drafts(b) for b in (1, 8, 9, 32, 128, 129)] == [63, 63, 15, 15, 3, 0]


def test_disabled_policy_keeps_the_main_tree():
    p = AdaptiveTreePolicy(TREES, False, 16, "cuda")
    assert p.choose(1000) == 0


def test_schedule_matches_choose_and_vllm_reads_it():
    from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

    p = policy(512)
    schedule = p.schedule(256)
    assert schedule[:3] == [(1, 8, 63), (9, 32, 15), (33, 128, 3)]
    assert schedule[-1][0] == 129 and schedule[-1][2] == 0
    lookup = build_dynamic_sd_schedule_lookup(schedule, vllm_max_batch_size=300,
                                              vllm_num_speculative_tokens=63)
    assert all(lookup[b] == p.num_drafts(b) for b in range(1, 301))


def test_tree_of_num_drafts():
    p = policy()
    assert [p.tree_of_num_drafts(n) for n in (63, 15, 3, 0)] == [0, 1, 2, NO_TREE]
    with pytest.raises(ValueError, match="no tree of the adaptive policy has 7 nodes"):
        p.tree_of_num_drafts(7)


def test_equal_sizes_keep_the_first_tree():
    p = AdaptiveTreePolicy([get_tree("sparse-15"), get_tree("sparse-15"), TokenTree.chain(3)], True, 64, "cuda")
    assert p.order == [0, 2] and p.choose(4) == 0


# ----------------------------------------------------------------------------- measured rule
from medusa_vllm.adaptive import MIN_SAMPLES, REMEASURE, RUN, bucket_of, bucket_range  # noqa: E402


def measured(accuracies=None) -> AdaptiveTreePolicy:
    return AdaptiveTreePolicy(TREES, True, 512, "cuda", policy="measured", head_accuracies=accuracies)


def simulate(p: AdaptiveTreePolicy, num_reqs: int, cost, steps: int) -> list[int]:
    """Runs ``steps`` decisions at one batch size; ``cost(k)`` = seconds of a step of choice k."""
    chosen = []
    for _ in range(steps):
        k = p.choose(num_reqs)
        p.observe_step(num_reqs, k, cost(k))
        chosen.append(k)
    return chosen


def test_buckets_cover_every_batch_size_once():
    seen = []
    for b in range(bucket_of(1), bucket_of(300) + 1):
        lo, hi = bucket_range(b)
        seen += range(lo, hi + 1)
    assert seen[:300] == list(range(1, 301))
    assert all(bucket_of(n) == b for b in range(12) for n in range(bucket_range(b)[0], bucket_range(b)[1] + 1))


def test_measured_rule_turns_speculation_off_where_every_tree_costs_more_than_it_returns():
    # τ prior without calibration: the generic small-model profile (2.06 / 1.82 / 1.48)
    p = measured()
    assert [round(p.tau(k), 2) for k in (0, 1, 2, NO_TREE)] == [2.06, 1.82, 1.48, 1.0]
    # batch 64: a plain step 4 ms, trees 4x / 3.5x / 3x that -> no drafts wins
    cost = {0: 16e-3, 1: 14e-3, 2: 12e-3, NO_TREE: 4e-3}.get
    chosen = simulate(p, 64, cost, REMEASURE - 2)  # no re-measurement yet
    # the budget rule's choice first, then no drafts; the bigger trees cost at least the 3-node
    # tree's 12 ms, so τ 2.06 / 12 ms and 1.82 / 12 ms cannot beat 1 / 4 ms: never measured
    assert chosen[: 2 * RUN] == [2] * RUN + [NO_TREE] * RUN
    assert chosen[0] == p.budget_choice(64) == 2
    assert set(chosen[2 * RUN:]) == {NO_TREE}
    assert p.summary()["ms_per_step"]["49-64"] == {"3": 12.0, "0": 4.0}
    # batch 1: a tree step 1.3x a plain one -> the 63-node tree (τ 2.06 / 1.3 beats 1 / 1). The
    # batch moves in decoding plainly, so no drafts is measured first (no transition), then the
    # budget rule's choice; the 3-node tree (1.48 / its 2 ms bound < 2.06 / 2.6) is skipped,
    # sparse-15 (1.82 / 2 ms) is not
    cost1 = {0: 2.6e-3, 1: 2.4e-3, 2: 2.3e-3, NO_TREE: 2e-3}.get
    chosen1 = simulate(p, 1, cost1, REMEASURE - 1)
    assert chosen1[: 3 * RUN] == [NO_TREE] * RUN + [0] * RUN + [1] * RUN
    assert set(chosen1[3 * RUN:]) == {0}
    # buckets are independent: batch 64 still decodes plainly
    assert p.choose(60) == NO_TREE


def test_a_bucket_of_more_requests_skips_what_fewer_requests_already_rule_out():
    """A step of more requests never costs less than the same choice's step of fewer: a choice
    whose τ over that bound cannot beat the best measured in the new bucket is not measured
    there (no measuring run, no transitions), until the re-measurement finds it a rival."""
    p = measured()
    cost1 = {0: 2.6e-3, 1: 2.4e-3, 2: 2.3e-3, NO_TREE: 2e-3}.get
    simulate(p, 1, cost1, 4 * RUN)
    assert p.choose(1) == 0
    # batch 2: everything 5% dearer. The 63-node tree (the choice of the step before) is measured
    # first; no drafts (1.1 / 2 ms at most) cannot beat its 2.06 / 2.73 ms, so it is not
    # measured here. The 3-node tree, never measured at batch 1, is bounded only by no drafts'
    # 2 ms (1.48 / 1.9 ms could win) and sparse-15 by its own 2.4 ms at batch 1: both are measured
    cost2 = {k: 1.05 * v for k, v in {0: 2.6e-3, 1: 2.4e-3, 2: 2.3e-3, NO_TREE: 2e-3}.items()}.get
    chosen = simulate(p, 2, cost2, REMEASURE - 1)
    assert chosen[: 3 * RUN] == [0] * RUN + [2] * RUN + [1] * RUN
    assert set(chosen[3 * RUN:]) == {0}
    assert set(p.summary()["ms_per_step"]["2"]) == {"63", "15", "3"}
    # the re-measurement takes the runner-up: sparse-15 (1.82 / 2.52 ms) over the 3-node tree
    # (1.48 / 2.42 ms); no drafts, which cannot win here, is not measured
    chosen = simulate(p, 2, cost2, RUN + 1)
    assert chosen == [1] * RUN + [0]


def test_a_new_bucket_starts_from_the_decided_choice_not_a_measuring_run():
    p = measured()
    cost1 = {0: 2.6e-3, 1: 2.4e-3, 2: 2.3e-3, NO_TREE: 2e-3}.get
    chosen = simulate(p, 1, cost1, REMEASURE)  # decision REMEASURE: the runner-up's run starts
    # (sparse-15, 1.82 / 2.4 ms); the 3-node tree, which cannot win, is never measured
    assert chosen[-2] == 0 and chosen[-1] == 1 and 2 not in chosen
    assert p.choose(2) == 0  # the batch grows mid-run: bucket 2 measures the decided 63-node tree


def test_the_choice_of_the_step_before_is_kept_through_a_near_tie():
    """A change of choice costs a transition step, so the choice the batch decodes stays while
    it scores within STICKY of the best; a clearer gain moves it."""
    from medusa_vllm.adaptive import STICKY

    p = measured()
    # batch 4: sparse-15 scores 1.82 / 2.3 ms = 0.791, the 63-node tree 2.06 / 2.58 ms = 0.798
    cost = {0: 2.58e-3, 1: 2.3e-3, 2: 2.2e-3, NO_TREE: 2e-3}.get
    assert 1.82 / 2.3 > STICKY * 2.06 / 2.58
    chosen = simulate(p, 4, cost, 6 * RUN)
    measuring = chosen[: 3 * RUN]  # the 63-node tree, no drafts, sparse-15 (the 3-node tree cannot win)
    assert measuring == [0] * RUN + [NO_TREE] * RUN + [1] * RUN
    assert set(chosen[3 * RUN:]) == {1}  # measured last, within STICKY of the best: kept
    # with the 63-node tree clearly ahead, the batch moves to it after sparse-15's run
    q = measured()
    cost = {0: 2.4e-3, 1: 2.3e-3, 2: 2.2e-3, NO_TREE: 2e-3}.get
    chosen = simulate(q, 4, cost, 6 * RUN)
    assert set(chosen[3 * RUN:]) == {0}


def test_measured_rule_measures_every_choice_that_could_win():
    # costs that grow slowly with the tree: each bigger tree could still win when it comes up
    p = measured()
    cost = {0: 2.8e-3, 1: 2.3e-3, 2: 2.1e-3, NO_TREE: 2e-3}.get
    chosen = simulate(p, 1, cost, 100)
    assert chosen[: 4 * RUN] == [0] * RUN + [NO_TREE] * RUN + [2] * RUN + [1] * RUN
    assert set(chosen[4 * RUN:]) == {1}  # τ 1.82 / 2.3 ms beats 2.06 / 2.8 ms


def test_measured_rule_remeasures_the_runner_up_and_follows_a_change():
    p = measured()
    costs = {0: 2.0e-3, 1: 2.5e-3, 2: 2.6e-3, NO_TREE: 2.5e-3}
    chosen = simulate(p, 1, costs.get, REMEASURE + 2 * RUN)
    tail = chosen[len(p.costs.choices) * RUN:]
    assert tail.count(0) >= len(tail) - RUN and tail.count(0) < len(tail)  # one run of the runner-up
    # the tree step gets slow (e.g. a longer context): after enough re-measurements the policy moves
    costs[0] = 20e-3
    chosen = simulate(p, 1, costs.get, 4 * REMEASURE)
    assert chosen[-RUN:] != [0] * RUN


def test_a_near_tie_goes_to_no_drafts():
    from medusa_vllm.adaptive import SPECULATION_MARGIN

    # batch 64, no drafts 4.46 ms a step (an H100, 45a52b6); the two big trees cost too much,
    # the smallest (τ 1.48) returns 15% or 5% more tokens per second than no drafts
    def run(tree_ms: float) -> list[int]:
        cost = {0: 50e-3, 1: 50e-3, 2: tree_ms, NO_TREE: 4.46e-3}.get
        return simulate(measured(), 64, cost, REMEASURE - 2)

    even = measured().tau(2) * 4.46e-3  # the smallest tree's cost at equal tokens per second
    assert SPECULATION_MARGIN >= 1.1
    win, tie = run(even / 1.15), run(even / 1.05)  # 15% and 5% more tokens per second
    assert set(win[3 * RUN:]) == {2}
    assert set(tie[3 * RUN:]) == {NO_TREE}


def test_measured_schedule_accounts_every_step():
    from medusa_vllm.adaptive import IDLE_FACTOR
    from medusa_vllm.vllm_plugin.scheduler import MeasuredSchedule

    m = MeasuredSchedule(measured(), [0] * 65)
    clock = 0.0
    for choice in [None] + [0] * 6 + [NO_TREE] * 5:  # a prefill, six tree steps, five plain ones
        m.step(clock, 40, choice)
        clock += 2e-3 if choice == NO_TREE else 5e-3
    clock += IDLE_FACTOR * 10 * 2e-3  # the engine waits for requests after the last one
    m.step(clock, 40, NO_TREE)
    spent = m.spent_summary()["33-48"]
    assert spent["mixed"] == {"steps": 1, "ms": 5.0}
    assert spent["63"] == {"steps": 6, "ms": 5.0}  # transitions included
    assert spent["0"] == {"steps": 5, "ms": pytest.approx(2.0)}  # the idle gap is not timed


def test_a_step_in_flight_when_the_engine_runs_out_of_requests_is_counted_not_timed():
    from medusa_vllm.vllm_plugin.scheduler import MeasuredSchedule

    m = MeasuredSchedule(measured(), [0] * 65)
    for i in range(4):  # four plain steps of 2 ms; the fourth is in flight when the round ends
        m.step(i * 2e-3, 1, NO_TREE)
    m.idle()
    m.step(5.0, 1, None)  # the next round's first step, seconds later
    m.step(5.0 + 7e-3, 1, NO_TREE)
    spent = m.spent_summary()["1"]
    assert spent["0"] == {"steps": 4, "ms": pytest.approx(2.0)}  # the gap is nobody's cost
    assert spent["mixed"] == {"steps": 1, "ms": pytest.approx(7.0)}
    # the policy took the one interval whose two steps before ran the same choice, not the gap
    assert m.policy.costs._seconds[(0, NO_TREE)] == deque([pytest.approx(2e-3)])
    m.idle()
    m.idle()  # nothing in flight: nothing to count
    assert m.spent_summary()["1"]["0"]["steps"] == 5


def test_idle_gaps_do_not_count_as_step_costs():
    p = measured()
    for _ in range(MIN_SAMPLES):
        p.observe_step(8, 0, 3e-3)
    p.observe_step(8, 0, 2.0)  # the engine waited for requests
    assert p.costs.seconds(8, 0) == pytest.approx(3e-3)
    for _ in range(MIN_SAMPLES + 2):  # but a lasting change of cost is taken
        p.observe_step(8, 0, 30e-3)
    assert p.costs.seconds(8, 0) == pytest.approx(30e-3)


def test_choice_without_clean_steps_is_given_up():
    p = measured()
    chosen = []
    for _ in range(40 * RUN):
        k = p.choose(4)
        chosen.append(k)
        if k != 1:  # sparse-15 never yields a clean step (e.g. new requests keep arriving)
            p.observe_step(4, k, {0: 2.6e-3, 2: 2e-3, NO_TREE: 1.5e-3}[k])
    assert chosen.count(1) == 3 * RUN  # MAX_TRIES measuring runs, then left out
    assert chosen[-1] == 0  # τ 2.06 / 2.6 ms beats 1.48 / 2 ms and 1 / 1.5 ms


def test_tau_starts_at_the_calibration_and_follows_what_verification_sees():
    acc = [[0.5, 0.6], [0.3, 0.4], [0.2, 0.3], [0.1, 0.2]]  # cumulative top-k per head
    p = AdaptiveTreePolicy([TokenTree.chain(2), TokenTree.chain(1)], True, 512, "cuda",
                           policy="measured", head_accuracies=acc)
    assert p.tau(0) == pytest.approx(1 + 0.5 + 0.5 * 0.3)
    assert p.tau(1) == pytest.approx(1.5)
    p.observe_acceptance([10_000.0, 0.0], [10_000.0, 0.0])  # tree 0: every request 1 token
    assert p.tau(0) == pytest.approx(1.0, abs=0.01)
    assert p.tau(1) == pytest.approx(1.5)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="adaptive_policy 'fastest' is not one of"):
        AdaptiveTreePolicy(TREES, True, 512, "cuda", policy="fastest")


# ----------------------------------------------------------------------------- scheduler side
def _scheduled(counts: dict, spec: dict, new: bool = False):
    from types import SimpleNamespace

    return SimpleNamespace(num_scheduled_tokens=counts, scheduled_spec_decode_tokens=spec,
                           scheduled_new_reqs=[object()] if new else [])


def test_step_choice_of_a_scheduled_step():
    from medusa_vllm.vllm_plugin.scheduler import step_choice

    p = measured()
    d15 = [-1] * 15
    assert step_choice(p, _scheduled({"a": 16, "b": 16}, {"a": d15, "b": d15})) == 1
    assert step_choice(p, _scheduled({"a": 1, "b": 1}, {})) == NO_TREE
    assert step_choice(p, _scheduled({"a": 16, "b": 1}, {"a": d15})) is None  # a mix
    assert step_choice(p, _scheduled({"a": 16, "b": 40}, {"a": d15})) is None  # a prefill chunk
    assert step_choice(p, _scheduled({"a": 16}, {"a": d15}, new=True)) is None  # a new request
    assert step_choice(p, _scheduled({"a": 6}, {"a": [-1] * 5})) is None  # not a tree's size
    assert step_choice(p, _scheduled({}, {})) is None


def test_measured_schedule_times_steady_steps_and_rewrites_the_table():
    from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

    from medusa_vllm.vllm_plugin.scheduler import MeasuredSchedule

    p = measured()
    lookup = build_dynamic_sd_schedule_lookup(p.schedule(64), vllm_max_batch_size=64,
                                              vllm_num_speculative_tokens=63)
    assert lookup[8] == 63 and lookup[9] == 15
    m = MeasuredSchedule(p, lookup)
    clock = 0.0
    for k in range(4):  # four clean steps of the 63-node tree at batch 8
        m.step(clock, 8, 0)
        clock += 9e-3 if k == 0 else 5e-3  # the first interval holds the transition's cost
    # the first two are not timed (a transition, and under asynchronous scheduling the interval
    # that still holds it), the third is (the fourth ends at the next step)
    assert list(p.costs._seconds[(bucket_of(8), 0)]) == [pytest.approx(5e-3)]
    # every step wrote the policy's choice for the bucket (7-8) into the scheduler's table
    k = p.costs._runs[bucket_of(8)][0]
    assert lookup[7] == lookup[8] == p.drafts_of(k) and lookup[9] == 15
    m.step(clock, 8, 2)  # a change of choice: its first step is a transition, not a cost
    m.step(clock + 1.0, 8, 2)  # nor is the second
    m.step(clock + 2.0, 8, None)  # not clean
    m.step(clock + 3.0, 8, 2)
    m.step(clock + 4.0, 8, 2)
    m.step(clock + 5.0, 8, 2)
    assert (bucket_of(8), 2) not in p.costs._seconds
    m.step(clock + 5.5, 8, 2)  # the third step of a clean run counts when it ends
    assert list(p.costs._seconds[(bucket_of(8), 2)]) == [pytest.approx(0.5)]


def test_as_ranges_merges_equal_neighbours():
    from medusa_vllm.adaptive import as_ranges

    assert as_ranges([63, 63, 15, 15, 15, 0]) == [(1, 2, 63), (3, 5, 15), (6, 6, 0)]
    assert as_ranges([7], first=4) == [(4, 4, 7)]


def test_simulation_on_measured_costs_finds_the_best_choice(tmp_path, capsys):
    """tools/adaptive_sim.py: the policy replayed on a run's measured step costs. With one clear
    winner per batch size (batch 1: the 63-node tree; batch 64: no drafts) it settles on it and
    comes within a few percent of that choice's tokens per second; a short run pays more for
    its measuring runs than a long one."""
    import json

    sim = _tool("adaptive_sim")
    adaptive = {"tau": {"63": 2.0, "15": 1.6},
                "ms_per_step": {"1": {"0": 1.0, "63": 1.2, "15": 1.15}, "49-64": {"0": 2.0, "63": 8.0, "15": 4.0}}}
    cost = sim.cost_table(adaptive)
    assert cost(1, 63) == pytest.approx(1.2e-3) and cost(40, 15) == pytest.approx(4.0e-3)  # nearest bucket
    tau = {63: 2.0, 15: 1.6}
    long, chosen = sim.simulate([63, 15], tau, cost, 1, 400, 0.05, seed=0)
    assert chosen.most_common(1)[0][0] == 63 and long * 1.2e-3 == pytest.approx(2.0, rel=0.05)
    short, _ = sim.simulate([63, 15], tau, cost, 1, 40, 0.05, seed=0)
    assert short < long
    big, chosen64 = sim.simulate([63, 15], tau, cost, 64, 400, 0.05, seed=0)
    assert chosen64.most_common(1)[0][0] == 0 and big * 2.0e-3 / 64 == pytest.approx(1.0, rel=0.05)
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"summary": {"medusa_stats": {"adaptive-v2": {"adaptive": adaptive}}}}))
    sim.main([str(path), "--batch-sizes", "1", "64", "--steps", "100", "--seeds", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:1] == ["1"] and lines[2].split()[3] == "63" and lines[3].split()[3] == "0"


def test_simulated_rounds_drain_through_buckets_and_charge_transitions(capsys):
    """tools/adaptive_sim.py --rounds: full batches that drain as requests reach max_tokens. The
    policy comes near the best fixed choice at each batch size; a transition cost lowers the
    policy (it changes choice), never a fixed choice; emitted lengths average τ."""
    import random

    sim = _tool("adaptive_sim")
    rng = random.Random(0)
    assert sum(sim.accepted_length(rng, 1.8, 4) for _ in range(4000)) / 4000 == pytest.approx(1.8, rel=0.03)
    adaptive = {"tau": {"63": 2.0, "15": 1.6},
                "ms_per_step": {"1": {"0": 1.0, "63": 1.2, "15": 1.15}, "49-64": {"0": 2.0, "63": 8.0, "15": 4.0}}}
    cost = sim.cost_table(adaptive)
    tau = {63: 2.0, 15: 1.6}
    args = dict(batch_sizes=[1, 64], rounds=4, max_tokens=64, noise=0.05, seed=0)
    fixed63, changes = sim.simulate_rounds([63, 15], tau, cost, transition=1.0, fixed=63, **args)
    assert changes == 0
    plain, _ = sim.simulate_rounds([63, 15], tau, cost, transition=1.0, fixed=0, **args)
    free, _ = sim.simulate_rounds([63, 15], tau, cost, transition=0.0, **args)
    charged, n = sim.simulate_rounds([63, 15], tau, cost, transition=1.0, **args)
    assert n > 0 and charged[1] < free[1]
    assert free[1] / fixed63[1] > 0.85 and free[64] / plain[64] > 0.85  # near the best of each
    with pytest.raises(SystemExit, match="give --rounds 0"):  # one round is all warm-up
        sim.main(["unused.json", "--rounds", "1"])


def test_choice_check_scores_the_rules_pick_against_every_steps_mean(tmp_path, capsys):
    """tools/adaptive_choice_check.py: per bucket, the pick the rule's final medians make, scored
    with the all-step means as a share of the best choice's tokens per ms; --pooled fits the
    trees' medians on one line in their node count; --fixed N scores a fixed choice."""
    import json

    tool = _tool("adaptive_choice_check")
    # the line through the trees: 2 + 0.01 ms a node; no drafts keeps its own
    assert tool.pooled({63: 2.63, 15: 2.2, 3: 2.0, 0: 1.5}) == pytest.approx({63: 2.63, 15: 2.15, 3: 2.03, 0: 1.5}, abs=0.01)
    assert tool.pooled({63: 2.0, 15: 3.0, 3: 3.0}) == pytest.approx({63: 2.667, 15: 2.667, 3: 2.667}, abs=1e-3)  # slope >= 0
    # bucket 1: a slow window made the 3-node tree the pick (1.3 / 2.0 > 2.0 / 3.2), though over
    # all steps the 63-node tree costs 2.2 ms: the pick gets (1.3 / 2.0) / (2.0 / 2.2) = 0.715
    # (a line through two trees is their medians: the pooled pick is the same). Bucket 49-64: no
    # drafts is the pick and the best. A choice with too few steps, and "mixed", are left out
    adaptive = {"tau": {"63": 2.0, "3": 1.3},
                "ms_per_step": {"1": {"63": 3.2, "3": 2.0, "0": 2.4}, "49-64": {"63": 9.0, "3": 6.0, "0": 3.0}},
                "steps": {"1": {"63": {"steps": 500, "ms": 2.2}, "3": {"steps": 40, "ms": 2.0},
                                "0": {"steps": 3, "ms": 1.0}, "mixed": {"steps": 9, "ms": 20.0}},
                          "49-64": {"63": {"steps": 12, "ms": 9.0}, "3": {"steps": 12, "ms": 6.0},
                                    "0": {"steps": 400, "ms": 3.0}}}}
    rows = {r["bucket"]: r for r in tool.check(adaptive, min_steps=10)}
    assert (rows["1"]["best"], rows["1"]["rule"], rows["1"]["pooled"]) == (63, 3, 3)
    assert rows["1"]["rule_share"] == pytest.approx((1.3 / 2.0) / (2.0 / 2.2)) == rows["1"]["pooled_share"]
    assert (rows["49-64"]["best"], rows["49-64"]["rule"], rows["49-64"]["rule_share"]) == (0, 0, 1.0)
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"summary": {"medusa_stats": {"adaptive-v2": {"adaptive": adaptive},
                                                             "medusa-v2:default-63": {"adaptive": None}}}}))
    tool.main([str(path), "--pooled", "--fixed", "63"])
    out = capsys.readouterr().out
    # the fixed 63-node tree: the best at batch 1, (2 / 9) / (1 / 3) of no drafts at 49-64
    assert rows["49-64"]["shares"][63] == pytest.approx(2 / 3)
    assert "fixed 63: 2 bucket decisions, mean share of the best 0.8333, below 0.95 in 1" in out
    assert "rule: 2 bucket decisions, mean share of the best 0.8575, below 0.95 in 1" in out
    assert "pooled: 2 bucket decisions, mean share of the best 0.8575, below 0.95 in 1" in out
    (tmp_path / "none.json").write_text("{}")
    with pytest.raises(SystemExit, match="no adaptive configuration"):
        tool.main([str(tmp_path / "none.json")])
