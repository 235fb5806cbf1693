"""The comparisons behind benchmarks/tp_check.py and benchmarks/training_distributed.py (their
engines and trainings run on GPUs; here only the bookkeeping that turns runs into figures)."""
import json

import pytest

from benchmarks.common import output_digest
from benchmarks.tp_check import Variant, default_variants, requests_per_batch, summarize
from benchmarks.training_distributed import compare, rel_diff


def test_variant_names():
    assert Variant.parse("tp2-medusa-ray") == Variant("tp2-medusa-ray", 2, True, "ray")
    assert Variant.parse("tp1-medusa") == Variant("tp1-medusa", 1, True, None)
    assert [Variant.parse(n).backend for n in default_variants(2)] == [None, None, "mp", "ray"]
    for bad in ("tp2-medusa-uni", "tp0-baseline", "medusa-mp", "tp2-eagle"):
        with pytest.raises(ValueError, match="expected tp<N>"):
            Variant.parse(bad)


def test_requests_cover_every_prompt_in_whole_batches():
    assert requests_per_batch([1, 32, 5], num_prompts=16, rounds=2) == {1: 16, 32: 64, 5: 20}


def _row(variant: str, tp: int, medusa: bool, bs: int, tps: float, outputs: list[list[int]]) -> dict:
    return {"variant": variant, "tensor_parallel_size": tp, "medusa": medusa, "batch_size": bs,
            "requests": len(outputs), "tokens_per_s": tps, "tau": 1.5 if medusa else None,
            "output_digests": [output_digest(o) for o in outputs]}


def test_tp_summary_counts_identical_outputs_and_speedups():
    same, other = [[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 7]]
    rows = [_row("tp1-medusa", 1, True, 1, 50.0, same), _row("tp2-baseline", 2, False, 1, 100.0, same),
            _row("tp2-medusa-mp", 2, True, 1, 150.0, same), _row("tp2-medusa-ray", 2, True, 1, 120.0, other)]
    rows, summary = summarize(rows, tp=2, errors={})
    mp, ray = rows[2], rows[3]
    assert (mp["identical_to_baseline"], mp["identical_to_tp1_medusa"]) == (2, 2)
    assert (ray["identical_to_baseline"], ray["identical_to_tp1_medusa"]) == (1, 1)
    assert rows[1]["identical_to_baseline"] is None  # the reference itself
    assert summary["speedup_bs1_mp"] == pytest.approx(1.5) and summary["speedup_bs1_ray"] == pytest.approx(1.2)
    assert summary["speedup_bs32_mp"] is None
    assert summary["greedy_identical"] is False  # one ray request differs
    _, summary = summarize(rows[:3], tp=2, errors={})
    assert summary["greedy_identical"] is True


def _run(losses: dict[int, list[float]], tps: float) -> dict:
    return {"curve": losses, "top1_curve": {s: [0.1] * len(v) for s, v in losses.items()},
            "train_tokens_per_s": tps, "steady_tokens_per_s": tps, "head_top1_acc": [0.3, 0.2],
            "wall_s": 1.0}


def test_training_comparison_against_single_and_noise():
    single = _run({10: [4.0, 5.0], 20: [2.0, 3.0]}, 100.0)
    ddp = _run({10: [4.04, 5.0], 20: [2.0, 3.0]}, 190.0)  # 1% off at one point
    fsdp = _run({10: [4.0, 5.0], 20: [2.2, 3.0]}, 150.0)  # 10% off
    reseed = _run({10: [4.0, 5.1], 20: [2.0, 3.0]}, 100.0)  # 2% off: the noise
    assert rel_diff(ddp["curve"], single["curve"]) == pytest.approx((0.01, 0.0025))
    rows, summary = compare({"single": single, "ddp": ddp, "fsdp": fsdp, "reseed": reseed}, 1.5)
    assert [r["step"] for r in rows] == [10, 20] and rows[1]["loss_fsdp"] == [2.2, 3.0]
    assert summary["loss_within_noise"] == {"ddp": True, "fsdp": False}
    assert summary["scaling_vs_single"] == pytest.approx({"ddp": 1.9, "fsdp": 1.5})
    with pytest.raises(ValueError, match="no logged step in common"):
        rel_diff({5: [1.0]}, {10: [1.0]})


def test_throughput_configurations_map_to_engine_settings():
    from types import SimpleNamespace

    from benchmarks.throughput import engine_kwargs

    args = SimpleNamespace(model="m", max_model_len=512, batch_sizes=[1, 4], acceptance="rejection",
                           adaptive_tree="sparse-15", builtin_k=4, gpu_memory_utilization=0.3)

    def spec(config):
        return engine_kwargs(args, config, "h", "b").get("speculative_config")

    assert spec("baseline") is None
    assert spec("medusa:sparse-31")["tree"] == "sparse-31"
    assert spec("adaptive")["adaptive_policy"] == "measured" and spec("adaptive")["tree"] == "sparse-15"
    assert spec("adaptive-budget")["adaptive_policy"] == "budget"
    assert spec("builtin") == {"method": "medusa", "model": "b", "num_speculative_tokens": 4}


def test_attention_option_sets_vllms_backend_and_the_tree_backends_parent(monkeypatch):
    """--attention flash: vLLM's configurations run FLASH_ATTN and medusa_vllm's engines get
    MEDUSA_VLLM_PARENT_ATTENTION=flash (its prefill chunks in FlashAttention); the default stays
    TRITON_ATTN with no variable; a CPU run sets neither."""
    from types import SimpleNamespace

    import torch

    from benchmarks.throughput import engine_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = SimpleNamespace(model="m", max_model_len=512, batch_sizes=[1, 4], acceptance="rejection",
                           adaptive_tree="sparse-15", builtin_k=4, gpu_memory_utilization=0.3,
                           tensor_parallel_size=1, attention="flash")
    for config in ("baseline", "builtin"):
        kw, env = engine_for(args, config, "h", "b", gpu=True)
        assert kw["attention_backend"] == "FLASH_ATTN" and env == {"MEDUSA_VLLM_PARENT_ATTENTION": "flash"}
    args.attention = "triton"
    kw, env = engine_for(args, "baseline", "h", "b", gpu=True)
    assert kw["attention_backend"] == "TRITON_ATTN" and env == {}
    _, env = engine_for(args, "baseline+MEDUSA_VLLM_PARENT_ATTENTION=flash", "h", "b", gpu=True)
    assert env == {"MEDUSA_VLLM_PARENT_ATTENTION": "flash"}  # a configuration's own setting stays


def test_configuration_environment_settings():
    from benchmarks.throughput import config_env

    assert config_env("baseline") == ("baseline", {})
    name = "medusa-async:default-63+MEDUSA_VLLM_KV_MOVE=eager+X=a=b"
    assert config_env(name) == ("medusa-async:default-63", {"MEDUSA_VLLM_KV_MOVE": "eager", "X": "a=b"})
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        config_env("medusa:sparse-15+MEDUSA_VLLM_KV_MOVE")


# ----------------------------------------------------------------------------- interleaved rounds
class FakeBench:
    """EngineBench's protocol without an engine: a round's rate is a function of the config and
    of how many rounds this process ran; each process has its own state."""

    def __init__(self, kw, prompts, max_tokens, temperature, length_spread=0.0):
        self.rate, self.rounds, self.rows = kw["rate"], 0, []
        if kw.get("broken") == "start":
            raise ValueError("engine did not start")
        self.kw = kw

    def warmup(self, batch_sizes, rounds=0, steady=0, queue=False):
        self.warmup_rounds, self.warmup_steady, self.warmup_queue = rounds, steady, queue

    def begin(self, b):
        self.b, self.rates, self.outputs = b, [], []

    def round(self, chunk, concurrency=None, queue=False):
        self.chunks = getattr(self, "chunks", []) + [(len(chunk), concurrency) + (("queue",) if queue else ())]
        if self.kw.get("broken") == "round" and self.rounds == 1:
            raise RuntimeError("step failed")
        self.rounds += 1
        rate = self.rate * (1 + self.rounds)  # drift: every engine gets faster round by round
        self.rates.append(rate)
        self.outputs += [[len(p)] for p in chunk]
        return rate

    def end(self):
        return {"batch_size": self.b, "requests": len(self.outputs), "tokens_per_s": max(self.rates),
                "round_tokens_per_s": self.rates, "tau": None, "outputs": self.outputs}

    def stats(self):
        return {"engine_start_s": 0.5, "medusa_stats": {"rounds": self.rounds},
                "warmup_rounds": self.warmup_rounds, "warmup_steady": self.warmup_steady,
                "warmup_queue": self.warmup_queue,
                "chunks": getattr(self, "chunks", [])}

    def finish(self):
        return self.stats() | {"profiles": {}}


def test_interleaved_engines_take_turns_and_pair_their_rounds():
    from types import SimpleNamespace

    from benchmarks.throughput import measure_interleaved, summarize

    engines = {"baseline": ({"rate": 10.0}, {}), "medusa:x": ({"rate": 15.0}, {}),
               "adaptive-async": ({"rate": 5.0, "broken": "start"}, {}),
               "medusa:y": ({"rate": 20.0, "broken": "round"}, {})}
    args = SimpleNamespace(batch_sizes=[1, 2], max_tokens=4, temperature=0.0, interleave=True)
    seen = []
    res = measure_interleaved(engines, ["a", "bb", "ccc"], args, {1: 3, 2: 4},
                              on_batch=lambda r: seen.append(dict(r["medusa:x"]["medusa_stats"])),
                              bench_cls=FakeBench)
    assert "did not start" in res["adaptive-async"]["error"] and "step failed" in res["medusa:y"]["error"]
    assert [r["batch_size"] for r in res["baseline"]["rows"]] == [1, 2]
    assert res["baseline"]["rows"][1]["requests"] == 4 and res["medusa:x"]["medusa_stats"] == {"rounds": 5}
    # after each batch size, with the stats so far (a run cut off later keeps them)
    assert seen == [{"rounds": 3}, {"rounds": 5}]
    rows, summary = summarize(res, args)
    x = next(r for r in rows if r["config"] == "medusa:x" and r["batch_size"] == 1)
    # both engines drifted alike: each round's ratio is 1.5, whatever the ratio of the medians
    assert x["speedup_paired"] == pytest.approx(1.5)
    assert x["speedup_paired_rounds"] == pytest.approx([1.5, 1.5, 1.5])  # 3 rounds of 1 request
    assert summary["interleaved"] and summary["speedup_paired"]["medusa:x"] == {1: pytest.approx(1.5),
                                                                              2: pytest.approx(1.5)}
    assert res["baseline"]["warmup_rounds"] == 0  # args without --warmup-rounds: none


def test_warmup_rounds_reach_every_engine():
    """--warmup-rounds goes to each engine's warmup, before any measured round."""
    from types import SimpleNamespace

    from benchmarks.throughput import measure_interleaved

    engines = {"baseline": ({"rate": 10.0}, {}), "medusa:x": ({"rate": 15.0}, {})}
    args = SimpleNamespace(batch_sizes=[1], max_tokens=4, temperature=0.0, interleave=True,
                           warmup_rounds=2)
    res = measure_interleaved(engines, ["a", "bb"], args, {1: 2}, bench_cls=FakeBench)
    assert {c: r["warmup_rounds"] for c, r in res.items()} == {"baseline": 2, "medusa:x": 2}


def test_steady_rounds_hold_k_batches_decoded_b_at_a_time():
    """--steady K: each round is K x b requests with at most b decoding at once (closed rounds
    without it: b requests, all at once), in the warm-up rounds too."""
    from types import SimpleNamespace

    from benchmarks.throughput import measure_interleaved

    engines = {"baseline": ({"rate": 10.0}, {}), "medusa:x": ({"rate": 15.0}, {})}
    args = SimpleNamespace(batch_sizes=[1, 2], max_tokens=4, temperature=0.0, interleave=True,
                           warmup_rounds=1, steady=3)
    res = measure_interleaved(engines, ["a", "bb"], args, {1: 6, 2: 12}, bench_cls=FakeBench)
    assert res["medusa:x"]["chunks"] == [(3, 1), (3, 1), (6, 2), (6, 2)]
    assert res["medusa:x"]["warmup_steady"] == 3 and res["baseline"]["rows"][1]["requests"] == 12
    args.steady, args.batch_sizes = 0, [2]
    res = measure_interleaved(engines, ["a", "bb"], args, {2: 4}, bench_cls=FakeBench)
    assert res["baseline"]["chunks"] == [(2, 2), (2, 2)]
    # --queue: the whole round goes to the engine at once (its max_num_seqs is b), warm-up too
    args.steady, args.queue = 3, True
    res = measure_interleaved(engines, ["a", "bb"], args, {2: 12}, bench_cls=FakeBench)
    assert res["medusa:x"]["chunks"] == [(6, 2, "queue"), (6, 2, "queue")]
    assert res["baseline"]["warmup_queue"] is True


def test_isolated_objects_live_in_their_own_processes():
    from benchmarks.common import Isolated

    a = Isolated(FakeBench, {"rate": 1.0}, [], 1, 0.0)
    b = Isolated(FakeBench, {"rate": 2.0}, [], 1, 0.0)
    try:
        a.call("begin", 1)
        b.call("begin", 1)
        assert [a.call("round", ["p"]), b.call("round", ["p"]), a.call("round", ["p"])] == [2.0, 4.0, 3.0]
        with pytest.raises(RuntimeError, match="AttributeError"):
            a.call("no_such_method")
        assert a.call("end")["round_tokens_per_s"] == [2.0, 3.0]  # still alive after an error
    finally:
        a.close()
        b.close()
    assert not a.proc.is_alive() and not b.proc.is_alive()
    with pytest.raises(RuntimeError, match="engine did not start"):
        Isolated(FakeBench, {"rate": 1.0, "broken": "start"}, [], 1, 0.0)


def test_sampling_json_merges_into_every_request_and_refuses_what_the_benchmark_sets():
    from types import SimpleNamespace

    from benchmarks.throughput import sampling_of

    args = SimpleNamespace(temperature=0.0, sampling_json='{"repetition_penalty": 1.1, "logprobs": 2}')
    assert sampling_of(args) == {"temperature": 0.0, "repetition_penalty": 1.1, "logprobs": 2}
    assert sampling_of(SimpleNamespace(temperature=0.7)) == {"temperature": 0.7}
    for bad in ('{"max_tokens": 4}', "[1]"):
        with pytest.raises(SystemExit, match="--sampling-json"):
            sampling_of(SimpleNamespace(temperature=0.0, sampling_json=bad))


class MeasuredBench(FakeBench):
    """FakeBench as ``benchmarks.throughput.measure`` drives it: SamplingParams keywords (a dict,
    as EngineBench takes them), rows with tokens and seconds, ``finish(profile batch sizes)``."""

    def __init__(self, kw, prompts, max_tokens, sampling, length_spread=0.0):
        assert isinstance(sampling, dict) and sampling["temperature"] >= 0.0, sampling
        assert 0.0 <= length_spread < 1, length_spread
        super().__init__(kw, prompts, max_tokens, sampling)
        self.max_tokens = max_tokens

    def end(self):
        row = super().end()
        return row | {"output_tokens": row["requests"] * self.max_tokens, "seconds": 1.0}

    def finish(self, profile_batch_sizes=()):
        return self.stats() | {"profiles": {}}


def _in_process(monkeypatch, module):
    """``module.run_isolated`` runs the function here, on MeasuredBench engines."""
    import benchmarks.throughput as throughput

    monkeypatch.setattr(throughput, "EngineBench", MeasuredBench)
    monkeypatch.setattr(module, "run_isolated", lambda fn, *a, env=None, timeout=None: fn(*a))


def test_step_cost_and_tp_check_drive_measure_as_it_is_called(monkeypatch, tmp_path):
    """benchmarks/step_cost.py and tp_check.py call throughput.measure positionally; a change of
    its signature (e.g. temperature -> SamplingParams keywords) must not leave them behind."""
    from types import SimpleNamespace

    import benchmarks.step_cost as step_cost
    import benchmarks.tp_check as tp_check

    _in_process(monkeypatch, step_cost)
    monkeypatch.setattr(step_cost, "builtin_layout", lambda *a: None)
    monkeypatch.setattr(step_cost, "prompts_for", lambda args: ["a", "bb", "ccc", "dddd"])
    monkeypatch.setattr(step_cost, "engine_for", lambda args, config, heads, builtin, gpu: ({"rate": 10.0}, {}))
    out = tmp_path / "step_cost.json"
    step_cost.main(["--model", "m", "--heads", "h", "--configs", "plain_default", "tree64_async",
                    "plain_v1_async_sampled", "tree64_async_sampled",
                    "--batch-sizes", "1", "2", "--max-tokens", "8", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["config"], r["batch_size"]) for r in rows] == [
        (c, b) for c in ("plain_default", "tree64_async", "plain_v1_async_sampled", "tree64_async_sampled")
        for b in (1, 2)]
    assert all("error" not in r and r["ms_per_step"] > 0 for r in rows), rows
    assert set(result["summary"]["tree64_async_sampled_vs_plain_sampled"]) == {"1", "2"}
    assert result["summary"]["cuda_graphs"] is False  # the issue's bool: this run is on the CPU

    _in_process(monkeypatch, tp_check)
    args = SimpleNamespace(gpu=False, batch_sizes=[1, 2], max_tokens=8, rounds=2, timeout=60)
    rows = tp_check.measure_variant(args, Variant.parse("tp1-medusa"), {"rate": 10.0}, ["a", "bb"])
    assert [r["batch_size"] for r in rows] == [1, 2] and rows[0]["tensor_parallel_size"] == 1


def test_negative_warmup_rounds_is_a_clear_error():
    from benchmarks.throughput import main

    with pytest.raises(SystemExit, match="--warmup-rounds -1: give 0"):
        main(["--warmup-rounds", "-1", "--model", "m", "--heads", "h"])
    with pytest.raises(SystemExit, match="--steady -2: give 0"):  # before any tokenizer or engine
        main(["--steady", "-2", "--model", "m", "--heads", "h"])
    for bad in ("1", "-0.1"):
        with pytest.raises(SystemExit, match=f"--length-spread {float(bad)}: give F in"):
            main(["--length-spread", bad, "--model", "m", "--heads", "h"])
    for bad in ([], ["--steady", "1", "--batch-sizes", "8"], ["--steady", "4", "--batch-sizes", "8", "16"]):
        with pytest.raises(SystemExit, match="--queue: give --steady K"):
            main(["--queue", *bad, "--model", "m", "--heads", "h"])


def test_merge_puts_runs_of_one_machine_in_one_result(tmp_path):
    """throughput.py --merge: runs with a few engines each (a GPU call's worth) become one result;
    each row keeps its speedup against its own run's baseline, a configuration measured in two
    runs is told apart, and runs of another machine or set-up are refused."""
    from types import SimpleNamespace

    from benchmarks.common import envelope, write_json
    from benchmarks.throughput import measure_interleaved, merge, summarize

    args = SimpleNamespace(batch_sizes=[1, 8], max_tokens=4, temperature=0.0, interleave=True)
    config = {"model": "m", "heads": "h", "max_tokens": 4, "temperature": 0.0, "sampling_json": None,
              "num_prompts": 3, "acceptance": "rejection", "max_model_len": 64, "interleave": True}

    def run(name, engines, device="GPU X", **changes):
        res = measure_interleaved(engines, ["a", "bb", "ccc"], args, {1: 2, 8: 8}, bench_cls=FakeBench)
        rows, summary = summarize(res, args)
        summary["device"], summary["cuda_graphs"] = device, True
        path = tmp_path / f"{name}.json"
        write_json(path, envelope("throughput", device=device, config=config | changes, rows=rows,
                                  summary=summary))
        return str(path)

    a = run("a", {"baseline": ({"rate": 10.0}, {}), "medusa-v2:default-63": ({"rate": 15.0}, {}),
                  "adaptive-v2": ({"rate": 12.0}, {})})
    b = run("b", {"baseline": ({"rate": 20.0}, {}), "builtin": ({"rate": 16.0}, {}),
                  "medusa-v2:default-63": ({"rate": 24.0}, {})})
    rows, summary = merge([a, b], tmp_path / "merged.json")
    names = {r["config"] for r in rows}
    assert names == {"baseline#1", "baseline#2", "medusa-v2:default-63#1", "medusa-v2:default-63#2",
                     "adaptive-v2", "builtin"}
    assert summary["speedup_bs1"] == pytest.approx(1.5)  # 15/10 beats 24/20 = 1.2: own baselines
    assert summary["speedup_bs64"] is None and summary["speedup_adaptive"] == {1: pytest.approx(1.2),
                                                                              8: pytest.approx(1.2)}
    assert summary["speedup_builtin_medusa_bs1"] == pytest.approx(0.8)
    assert summary["greedy_identical"] is True and summary["device"] == "GPU X"
    assert set(summary["speedup_paired"]) == names - {"baseline#1", "baseline#2"}
    written = json.loads((tmp_path / "merged.json").read_text())
    assert [m["file"] for m in written["config"]["merged_from"]] == ["a.json", "b.json"]
    with pytest.raises(SystemExit, match="device"):
        merge([a, run("c", {"baseline": ({"rate": 1.0}, {})}, device="GPU Y")], tmp_path / "x.json")
    with pytest.raises(SystemExit, match="max_tokens"):
        merge([a, run("d", {"baseline": ({"rate": 1.0}, {})}, max_tokens=8)], tmp_path / "x.json")
    # closed rounds and --steady rounds do not mix; a run from before the options ran their defaults
    with pytest.raises(SystemExit, match="steady"):
        merge([a, run("e", {"baseline": ({"rate": 1.0}, {})}, steady=4)], tmp_path / "x.json")
    with pytest.raises(SystemExit, match="length_spread"):
        merge([a, run("f", {"baseline": ({"rate": 1.0}, {})}, length_spread=0.5)], tmp_path / "x.json")
    merge([a, run("g", {"baseline": ({"rate": 1.0}, {})}, steady=0, length_spread=0.0)], tmp_path / "x.json")


def test_steady_decode_refills_a_finished_slot_at_once_and_keeps_order(monkeypatch):
    """EngineBench._decode against an engine stand-in (vLLM's add_request / step /
    has_unfinished_requests): never more than `concurrency` requests in flight, a finished
    request's slot refilled before the next step, outputs in the chunk's order, each request
    timed from its admission to its end. The stand-in's clock advances one second a step, so
    the latencies are exact (wall time of steps that do no work is noise: CI once saw the
    1-step request take longer than the 4-step one)."""
    from types import SimpleNamespace

    import benchmarks.throughput as throughput
    from benchmarks.throughput import EngineBench

    clock = [0.0]
    monkeypatch.setattr(throughput, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    class Engine:
        def __init__(self):
            self.live, self.most, self.steps = {}, 0, 0

        def add_request(self, rid, prompt, params):
            self.live[rid] = len(prompt)  # a prompt of n characters takes n steps
            self.most = max(self.most, len(self.live))
            return rid + "-internal"

        def has_unfinished_requests(self):
            return bool(self.live)

        def step(self):
            self.steps += 1
            clock[0] += 1.0
            out = []
            for rid in list(self.live):
                self.live[rid] -= 1
                done = self.live[rid] == 0
                if done:
                    del self.live[rid]
                out.append(SimpleNamespace(request_id=rid, finished=done,
                                           outputs=[SimpleNamespace(token_ids=[rid])]))
            return out

    bench = EngineBench.__new__(EngineBench)
    bench.llm, bench.sp, bench._next_id = SimpleNamespace(llm_engine=Engine()), None, 0
    bench.length_spread = 0.0
    chunk = ["aaa", "a", "a", "aa", "a", "aaaa"]
    res, latencies = bench._decode(chunk, 2)
    engine = bench.llm.llm_engine
    assert engine.most == 2 and len(res) == 6
    assert [o.outputs[0].token_ids[0] for o in res] == [f"steady-{i}" for i in range(6)]
    # 2 slots: "aaa" runs steps 1-3 beside "a" (1), "a" (2), "aa" (3-4); then "a" (4), "aaaa" (5-8)
    assert engine.steps == 8
    assert latencies == [3.0, 1.0, 1.0, 2.0, 1.0, 4.0]  # each from its own admission
    # --queue: every request submitted before the first step (the engine's own queue holds
    # them), each timed from its submission to its own end, not the round's
    bench.llm, clock[0] = SimpleNamespace(llm_engine=Engine()), 100.0
    res, latencies = bench._decode(chunk, 2, queue=True)
    engine = bench.llm.llm_engine
    assert engine.most == 6 and engine.steps == 4  # this stand-in runs them all at once
    assert [o.outputs[0].token_ids[0] for o in res] == [f"steady-{i}" for i in range(6, 12)]
    assert latencies == [3.0, 1.0, 1.0, 2.0, 1.0, 4.0]  # "a" ended at step 1, "aaaa" at step 4


def _tool(name: str, folder: str = "tools/gpu"):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / f"{folder}/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_tools_replay_the_benchmark_greedy_unless_told():
    """tools/gpu/step_log.py and mixed_profile.py send their requests as throughput.py does:
    greedy unless --temperature (step_log once left vLLM's default, temperature 1.0, seeded)."""
    from benchmarks.throughput import sampling_of, tool_args

    base = ["--model", "m", "--heads", "h", "--out", "o"]
    for name in ("step_log", "mixed_profile"):
        parser = _tool(name).parser()
        args = parser.parse_args(base)
        sizes = getattr(args, "batch_sizes", [getattr(args, "batch_size", 1)])
        assert sampling_of(tool_args(args.model, sizes, args.temperature)) == {"temperature": 0.0}, name
        args = parser.parse_args([*base, "--temperature", "0.7"])
        assert sampling_of(tool_args(args.model, sizes, args.temperature)) == {"temperature": 0.7}, name


def test_length_spread_gives_each_request_its_own_seeded_length():
    """--length-spread F: request i of every round asks max_tokens x [1-F, 1+F], the same for every
    configuration (seeded by i); with F = 0 every request asks max_tokens; the steady loop hands
    each request its own SamplingParams."""
    from types import SimpleNamespace

    from benchmarks.throughput import EngineBench, request_max_tokens

    assert [request_max_tokens(i, 128, 0.0) for i in range(5)] == [128] * 5
    lengths = [request_max_tokens(i, 128, 0.5) for i in range(400)]
    assert lengths == [request_max_tokens(i, 128, 0.5) for i in range(400)]  # seeded
    assert min(lengths) >= 64 and max(lengths) <= 192 and len(set(lengths)) > 50
    assert abs(sum(lengths) / len(lengths) - 128) < 6  # the mean stays near --max-tokens

    class Engine:
        def __init__(self):
            self.asked, self.live = {}, set()

        def add_request(self, rid, prompt, params):
            self.asked[rid], _ = params.max_tokens, self.live.add(rid)

        def has_unfinished_requests(self):
            return bool(self.live)

        def step(self):
            rid = min(self.live)
            self.live.discard(rid)
            return [SimpleNamespace(request_id=rid, finished=True, outputs=[SimpleNamespace(token_ids=[1])])]

    bench = EngineBench.__new__(EngineBench)
    bench.llm, bench._next_id = SimpleNamespace(llm_engine=Engine()), 0
    bench.sp, bench.sampling, bench.length_spread, bench._by_length = SimpleNamespace(max_tokens=16), {}, 0.5, {}
    bench._decode(["p"] * 6, 2)
    assert list(bench.llm.llm_engine.asked.values()) == [request_max_tokens(i, 16, 0.5) for i in range(6)]
    assert bench.params(3) is bench.params(3)  # one SamplingParams per length
    bench.length_spread = 0.0
    assert bench.params(3) is bench.sp


def test_closed_round_tail_model_charges_the_slowest_request():
    """tools/closed_round_tail.py: a round lasts until its slowest request, each step at the cost
    of the requests still running; with equal steps per request that is the full-batch figure."""
    tail = _tool("closed_round_tail", "tools")
    cost = {1: 1.0, 4: 2.0}  # ms per step at 1 and 4 running requests, linear between
    assert tail.interp(cost, 2) == pytest.approx(4 / 3) and tail.interp(cost, 9) == 2.0
    assert tail.bucket_costs({"1": {"0": 1.5, "15": 1.7}, "3-4": {"15": 2.5}}, 15) == {1: 1.7, 4: 2.5}
    # 4 requests, 8 tokens each, plain steps 1 ms: 8 ms a round
    uniform, with_tail = tail.round_ratios([4, 4, 4, 4], 4, 8, 1.0, cost)
    assert uniform == with_tail == pytest.approx(8 / (4 * 2.0))
    # one request needs 6 steps: 4 steps of all four (2 ms), then 2 of one (1 ms) = 10 ms
    uniform, with_tail = tail.round_ratios([4, 4, 4, 6], 4, 8, 1.0, cost)
    assert uniform == pytest.approx(8 / (4.5 * 2.0)) and with_tail == pytest.approx(8 / 10)


def test_verify_step_cost_runs_every_variant_and_prices_it_against_greedy(monkeypatch, tmp_path):
    """tools/gpu/verify_step_cost.py off a GPU (its steps eagerly, a tiny vocabulary): one row
    per tree, variant and batch size, and each variant's excess over the greedy step."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("verify_step_cost", "tools/gpu/verify_step_cost.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "v.json"
    monkeypatch.setattr(sys, "argv", ["x", "--trees", "sparse-15", "--batch-sizes", "1", "2", "--steps", "1",
                                      "--vocab", "256", "--profile", "--top", "3", "--out", str(out)])
    tool.main()
    d = json.loads(out.read_text())
    assert len(d["rows"]) == 2 * len(tool.VARIANTS) and not d["rows"][0]["graphs"]
    cell = d["summary"]["wall_us_per_step"]["sparse-15/bs2"]
    assert set(cell) == set(tool.VARIANTS) | {f"{v}_minus_greedy" for v in tool.VARIANTS[1:]}
    assert cell["top-p_minus_greedy"] == round(cell["top-p"] - cell["greedy"], 1)
    assert len(d["summary"]["profiles"]) == len(tool.VARIANTS) and d["config"]["filter"] == "reference sort"
    parts = d["summary"]["components"]
    assert [(p["tree"], p["batch_size"]) for p in parts] == [("sparse-15", 1), ("sparse-15", 2)]
    assert all(p[k] > 0 for p in parts for k in ("logits_copy_us", "argmax_all_rows_us", "level_target_top_p_us",
                                                 "level_target_no_filter_us"))
