"""Where a throughput round's time goes, step by step: each configuration's engine (as
benchmarks/throughput.py builds it, one spawned process each) runs throughput.py's warm-up and
rounds while its worker logs every step — host times of execute_model and sample_tokens, the
interval to the next step, the step's kind (medusa_vllm's step key and the paths it took, or the
query length for vLLM's own runner), requests and tokens. Prints per round the wall time, the
steps and the time by kind, and the slowest steps; writes everything to --out.
Usage: python tools/gpu/step_log.py --model M --heads H --configs baseline adaptive-async \
           --batch-sizes 8 64 --rounds 4 --max-tokens 128 --out step_log.json"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


# the runner's parts timed per step (those it has; host seconds, nested parts counted in each)
PARTS = ("_update_states", "_prepare_inputs", "_medusa_plan", "_prepare_input_ids",
         "_determine_batch_execution_and_padding", "_build_attention_metadata", "_preprocess",
         "_model_forward", "_sample", "_medusa_propose", "_bookkeeping_sync",
         "propose_draft_token_ids", "_copy_draft_token_ids_to_cpu",
         "_update_states_after_model_execute", "_calc_spec_decode_metadata",
         "_compute_prev_positions", "_get_valid_sampled_token_count", "_medusa_uniform_plan",
         "_medusa_upload",
         # vLLM's V2 runner (and medusa_vllm's on it, runner_v2.py)
         "update_requests", "add_requests", "finish_requests", "prepare_inputs", "prepare_attn",
         "_medusa_prepare_tree", "sample", "_medusa_general", "postprocess_sampled")


def install(worker) -> None:
    """Wraps the worker's runner: one record per step (perf_counter seconds)."""
    runner = worker.model_runner
    log: list[dict] = []
    worker._step_log = log
    exec_model, sample = runner.execute_model, runner.sample_tokens
    cur: dict[str, float] = {}  # host seconds of the runner's parts in the step in flight

    def timed(name: str):
        f = getattr(runner, name)

        def g(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                cur[name] = cur.get(name, 0.0) + time.perf_counter() - t
        setattr(runner, name, g)

    for name in PARTS:
        if hasattr(runner, name):
            timed(name)
    compiles = _watch_compiles()  # JIT compiles (Triton kernels, dynamo frames) in the step
    graph: list[str] = []  # V2 runner: the CUDA graph each forward dispatched to ("FULL:4096", "NONE:4160")
    manager = getattr(runner, "cudagraph_manager", None)
    if manager is not None and hasattr(manager, "dispatch"):
        dispatch = manager.dispatch

        def traced_dispatch(*a, **k):
            desc = dispatch(*a, **k)
            graph.append(f"{getattr(desc.cg_mode, 'name', desc.cg_mode)}:{desc.num_tokens}")
            return desc
        manager.dispatch = traced_dispatch

    def execute_model(so, *a, **k):
        cur.clear()
        compiles.clear()
        graph.clear()
        t0 = time.perf_counter()
        paths = getattr(runner, "medusa_paths", None)
        before = dict(paths.counts) if paths is not None else {}
        out = exec_model(so, *a, **k)
        counts = so.num_scheduled_tokens
        rec = {"t0": t0, "t1": time.perf_counter(), "reqs": len(counts),
               "tokens": so.total_num_scheduled_tokens, "new": len(so.scheduled_new_reqs),
               "q": max(counts.values()) if counts else 0}
        if paths is not None:
            rec["key"] = paths.key
            rec["paths"] = sorted(w for (kk, w), n in paths.counts.items() if before.get((kk, w)) != n)
        else:
            rec["key"] = "prefill" if rec["new"] or rec["q"] > 1 else "decode"
        rec["parts"] = cur.copy()
        if graph:
            rec["graph"] = graph[-1]
        log.append(rec)
        return out

    def sample_tokens(*a, **k):
        t0 = time.perf_counter()
        out = sample(*a, **k)
        if log:
            log[-1]["s0"], log[-1]["s1"] = t0, time.perf_counter()
            log[-1]["parts"].update({f"{n} (sample)": v for n, v in cur.items()
                                     if v != log[-1]["parts"].get(n)})
            if compiles:
                log[-1]["compiles"] = list(compiles)
        return out

    runner.execute_model, runner.sample_tokens = execute_model, sample_tokens


def _watch_compiles() -> list:
    """[(kind, name, ms, why)] of the JIT compiles since the list was last cleared: Triton kernels
    compiled (not found in the process's cache; a disk-cache hit counts too), ``why`` the parts of
    the kernel's specialization key that differ from the closest variant compiled before (argument
    alignments, constexprs: what made this launch new); frames dynamo compiled (torch.compile'd
    functions, recompiles included), ``why`` the function and the guard that failed (a recompile)."""
    seen: list = []
    try:
        from triton.runtime.jit import JITFunction

        do_compile = JITFunction._do_compile

        def traced(self, *a, **k):
            key = a[0] if a else k.get("key")
            try:
                before = list(self.device_caches[a[2] if len(a) > 2 else k.get("device")][0])
            except (AttributeError, IndexError, KeyError, TypeError):
                before = []
            t = time.perf_counter()
            try:
                return do_compile(self, *a, **k)
            finally:
                seen.append(("triton", getattr(self, "__name__", "?"), 1e3 * (time.perf_counter() - t),
                             key_diff(str(key), [str(b) for b in before])))
        JITFunction._do_compile = traced
    except (ImportError, AttributeError):
        pass
    try:
        import logging

        import torch
        from torch._dynamo.callback import on_compile_end, on_compile_start

        reasons: list[str] = []  # dynamo's recompile messages (function, failed guard)

        class Keep(logging.Handler):
            def emit(self, record):
                reasons.append(" ".join(record.getMessage().split())[:400])

        torch._logging.set_logs(recompiles=True)
        logging.getLogger("torch._dynamo.guards.__recompiles").addHandler(Keep())
        start = [0.0, 0, ""]  # when, reasons already told (dynamo logs one before it compiles), id

        def began(*a, **k):
            start[0] = time.perf_counter()
            start[2] = str(getattr(a[0], "compile_id", "")) if a else ""

        def ended(*a, **k):
            why = "; ".join(reasons[start[1]:]) or "first compile of a frame"
            start[1] = len(reasons)
            seen.append(("dynamo", f"frame {start[2]}", 1e3 * (time.perf_counter() - start[0]), why))
        on_compile_start(began)
        on_compile_end(ended)
    except (ImportError, AttributeError, TypeError):
        pass
    return seen


def key_diff(key: str, before: list[str], width: int = 400) -> str:
    """What in Triton's specialization key ``key`` differs from the closest of the keys compiled
    ``before`` (the variant it is new against): ``"<earlier> -> <now>"`` per differing part."""
    import difflib

    if not before:
        return "first variant"
    best = max(before, key=lambda b: difflib.SequenceMatcher(None, b, key, autojunk=False).ratio())
    m = difflib.SequenceMatcher(None, best, key, autojunk=False)
    parts = [f"{best[max(i1 - 24, 0):i2 + 8]!r} -> {key[max(j1 - 24, 0):j2 + 8]!r}"
             for op, i1, i2, j1, j2 in m.get_opcodes() if op != "equal"]
    return f"{len(before)} earlier variants; " + "; ".join(parts)[:width]


def mark(worker) -> int:
    return len(worker._step_log)


def dump(worker) -> list[dict]:
    return worker._step_log


def run_config(kw: dict, prompts: list[str], batch_sizes: list[int], rounds: int,
               max_tokens: int, steady: int = 0, sampling: dict | None = None) -> dict:
    from benchmarks.throughput import EngineBench, requests_for, round_size

    bench = EngineBench(kw, prompts, max_tokens, sampling or {"temperature": 0.0})
    bench.warmup(batch_sizes)
    llm = bench.llm
    llm.collective_rpc(install)
    marks = []
    for b in batch_sizes:
        n = round_size(b, steady)  # b (a closed round), or K x b at most b at a time (--steady K)
        todo = requests_for(prompts, n * rounds)
        for r in range(rounds):
            m0 = llm.collective_rpc(mark)[0]
            s = time.perf_counter()
            bench._decode(todo[r * n : (r + 1) * n], b)
            marks.append({"b": b, "round": r, "wall": time.perf_counter() - s, "start": s,
                          "first": m0, "end": llm.collective_rpc(mark)[0]})
    from medusa_vllm.vllm_plugin import adaptive_summary

    try:
        adaptive = adaptive_summary(llm)
    except Exception:  # noqa: BLE001 - not a medusa_vllm engine
        adaptive = None
    return {"marks": marks, "log": llm.collective_rpc(dump)[0], "adaptive": adaptive}


def report(name: str, res: dict, top: int) -> dict:
    log, out = res["log"], []
    for m in res["marks"]:
        steps = log[m["first"] : m["end"]]
        by: dict[str, list[float]] = {}
        for i, s in enumerate(steps):
            nxt = steps[i + 1]["t0"] if i + 1 < len(steps) else None
            s["interval_ms"] = 1e3 * (nxt - s["t0"]) if nxt else None
            s["host_ms"] = 1e3 * ((s["t1"] - s["t0"]) + (s.get("s1", 0) - s.get("s0", 0)))
            e = by.setdefault(s["key"], [0, 0.0, 0.0, {}, {}])
            e[0] += 1
            mode = s.get("graph", "").split(":")[0] or "-"
            e[4][mode] = e[4].get(mode, 0) + 1
            e[1] += s["interval_ms"] or 0.0
            e[2] += s["host_ms"]
            for n, v in s.get("parts", {}).items():
                e[3][n] = e[3].get(n, 0.0) + v
        lead = 1e3 * (steps[0]["t0"] - m["start"]) if steps else None
        slow = sorted((s for s in steps if s["interval_ms"]), key=lambda s: -s["interval_ms"])[:top]
        row = {"config": name, "b": m["b"], "round": m["round"], "wall_ms": 1e3 * m["wall"],
               "steps": len(steps), "lead_ms": lead,
               "by_key": {k: {"steps": n, "interval_ms": round(t, 2), "host_ms": round(h, 2), "graphs": modes,
                              "parts_ms_per_step": {p: round(1e3 * v / n, 3) for p, v in parts.items()}}
                          for k, (n, t, h, parts, modes) in sorted(by.items())},
               "slowest": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in s.items()
                            if k not in ("t0", "t1", "s0", "s1")} for s in slow]}
        out.append(row)
        print(f"{name:>16} bs={m['b']:>3} round {m['round']}: {row['wall_ms']:8.1f} ms wall, "
              f"{len(steps)} steps, first step after {lead or 0:.1f} ms", flush=True)
        for k, v in row["by_key"].items():
            print(f"{'':>20}{k:>8}: {v['steps']:>4} steps {v['interval_ms']:9.1f} ms "
                  f"(host {v['host_ms']:8.1f}) graphs {v['graphs']} parts/step {v['parts_ms_per_step']}")
        for s in row["slowest"]:
            print(f"{'':>20}slow: {s}")
    return {"rounds": out, "adaptive": res["adaptive"]}


def parser() -> argparse.ArgumentParser:
    from benchmarks.throughput import add_tool_arguments

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--heads", required=True)
    ap.add_argument("--configs", nargs="+", default=["baseline", "adaptive-async"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 64])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--steady", type=int, default=0, metavar="K",
                    help="rounds of K x b requests, at most b decoding at a time (throughput.py --steady)")
    ap.add_argument("--top", type=int, default=6)
    add_tool_arguments(ap)
    ap.add_argument("--out", required=True)
    return ap


def main() -> None:
    args = parser().parse_args()
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # callables over collective_rpc
    import torch

    from benchmarks.common import run_isolated, write_envelope
    from benchmarks.throughput import engine_for, prompts_for, sampling_of, tool_args

    targs = tool_args(args.model, args.batch_sizes, args.temperature, args.attention)
    prompts = prompts_for(targs)
    results = {}
    for name in args.configs:
        kw, env = engine_for(targs, name, args.heads, None, torch.cuda.is_available())
        res = run_isolated(run_config, kw, prompts, args.batch_sizes, args.rounds, args.max_tokens, args.steady, sampling_of(targs),
                           env=env | {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"})
        results[name] = report(name, res, args.top)
    write_envelope(Path(args.out), "step_log", vars(args) | {"log": "per round: steps by kind, slowest steps"},
                   *rows_and_summary(results))


def rows_and_summary(results: dict) -> tuple[list, dict]:
    """The envelope's rows (one per configuration and round) and summary: per configuration
    and batch size the rounds' wall ms and the mean interval of each step kind over them."""
    rows = [r for res in results.values() for r in res["rounds"]]
    summary: dict = {"rounds_wall_ms": {}, "step_ms_by_kind": {}, "adaptive": {}}
    for name, res in results.items():
        for r in res["rounds"]:
            summary["rounds_wall_ms"].setdefault(name, {}).setdefault(r["b"], []).append(round(r["wall_ms"], 1))
            kinds = summary["step_ms_by_kind"].setdefault(name, {}).setdefault(r["b"], {})
            for k, v in r["by_key"].items():
                e = kinds.setdefault(k, [0, 0.0])
                e[0] += v["steps"]
                e[1] += v["interval_ms"]
        for kinds in summary["step_ms_by_kind"].get(name, {}).values():
            for k, (n, ms) in list(kinds.items()):
                kinds[k] = {"steps": n, "ms": round(ms / n, 3)}
        summary["adaptive"][name] = res.get("adaptive")
    from training.report import device_name

    summary["device"] = device_name()
    return rows, summary


if __name__ == "__main__":
    main()
