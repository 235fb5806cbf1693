"""Reliability of `vllm serve` with Medusa under load, against a server without speculation.

    python benchmarks/serve_load.py [--requests 500] [--concurrency 32] [--timeout 300] [--tree sparse-7]

Starts two OpenAI servers on free loopback ports, together (each pinned to its own cores on CPU):
Medusa (`--speculative-model medusa_vllm`, bundled heads for the bundled model unless --heads) and
no speculation, same model / dtype / eager / context settings. Sends a seeded mix of chat and
completion requests, streamed and not, greedy and sampled (temperature 0.8, seeded), short and long
max_tokens, short and long prompts, with ~10 % closed by the client after a few chunks, to the Medusa
server at --concurrency; then replays every greedy request whole on the no-speculation server and
compares token ids (`return_token_ids`): equal for completed requests, a prefix for cancelled ones.

Pass: no server error (HTTP status >= 400, error event in a stream, dropped connection), no request
past --timeout, greedy token ids identical, `/health` and a new request answered afterwards, and
once the load drains vLLM's `/metrics` show nothing running and the KV cache empty
(`kv_blocks_leaked` = `vllm:kv_cache_usage_perc` x usable blocks). Writes
benchmarks/results/serve_load_<dev>.json; exits 1 when a criterion fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, device_tag, write_envelope  # noqa: E402

CPU_SERVE_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
                  "--gpu-memory-utilization", "0.15", "--seed", "0"]
CANCEL_FRACTION = 0.1
PROMPT_CHARS_LONG = 1800  # long prompts: MT-Bench questions joined up to ~450 tokens


# ----------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_cli() -> str:
    """The `vllm` command of this Python environment (what users run)."""
    here = Path(sys.executable).parent / "vllm"
    return str(here) if here.exists() else (shutil.which("vllm") or "vllm")


class Server:
    """One `vllm serve` on a free loopback port, in its own process group (API server, engine
    core and workers end together); output goes to ``log``. A context manager that kills it."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict | None = None):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log_dir) / f"{name}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.command = [vllm_cli(), "serve", *args, "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(1)
        raise TimeoutError(f"{self.name} server not ready in {timeout:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=5, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def metrics(self) -> dict[str, float]:
        """vLLM's Prometheus gauges and counters (first sample of each name), plus
        ``num_gpu_blocks`` from ``vllm:cache_config_info``."""
        text = httpx.get(self.url + "/metrics", timeout=10, trust_env=False).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"^(vllm:[\w:]+)(?:\{[^}]*\})? (\S+)$", line)
            if m:
                out.setdefault(m[1], float(m[2]))
        blocks = re.search(r'num_gpu_blocks="(\d+)"', text)
        if blocks:
            out["num_gpu_blocks"] = float(blocks[1])
        return out

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        self._signal(signal.SIGKILL)  # whatever of the group is left (engine core, workers)
        self.proc.wait()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def start_servers(model: str, medusa_args: list[str], log_dir: Path, stack: ExitStack,
                  serve_args: list[str] = CPU_SERVE_ARGS, timeout: float = 600) -> tuple[Server, Server]:
    """Medusa and no-speculation servers started together; on CPU each gets its own cores."""
    binds = cpu_binds(2)
    medusa = stack.enter_context(Server("medusa", [model, *serve_args, *medusa_args], log_dir,
                                        binds[0]))
    base = stack.enter_context(Server("no_spec", [model, *serve_args], log_dir, binds[1]))
    for server in (medusa, base):
        server.wait_ready(timeout)
    return medusa, base


def cpu_binds(n: int) -> list[dict]:
    """``VLLM_CPU_OMP_THREADS_BIND`` splitting this process's cores between n CPU servers (vLLM's
    auto binding puts every server's worker on the same core); no setting on GPU machines."""
    import torch

    cores = sorted(os.sched_getaffinity(0))
    if torch.cuda.is_available() or len(cores) < n or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return [{}] * n
    share = len(cores) // n
    return [{"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores[i * share:(i + 1) * share]))}
            for i in range(n)]


# ----------------------------------------------------------------------------- workload
@dataclass(frozen=True)
class RequestSpec:
    index: int
    api: str  # "chat" | "completion"
    prompt: str
    stream: bool
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    seed: int | None = None
    cancel_after: int | None = None  # close the stream after this many chunks with tokens
    extra: dict = field(default_factory=dict)  # more request fields (stop, logprobs, n, ...)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.api == "chat" else "/v1/completions"

    def body(self, model: str) -> dict:
        body = dict(model=model, max_tokens=self.max_tokens, temperature=self.temperature,
                    stream=self.stream, return_token_ids=True, **self.extra)
        if self.seed is not None:
            body["seed"] = self.seed
        if self.api == "chat":
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        return body


def build_workload(n: int, model: str, seed: int = 0, long_tokens: tuple[int, int] = (96, 192),
                   questions: list[str] | None = None) -> list[RequestSpec]:
    """n requests drawn with ``seed``: half chat / half completion (the chat prompt rendered with
    the model's template), half streamed, half greedy, half sampled (temperature 0.8, each with
    its own seed), half short (1-32) / half long (``long_tokens``)
    max_tokens, 15 % long prompts, ~10 % closed by the client after 2-6 chunks."""
    from transformers import AutoTokenizer

    from medusa_vllm.prompts import chat, mt_bench_questions

    tokenizer = AutoTokenizer.from_pretrained(model)
    questions = questions or mt_bench_questions()
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        cancel = rng.random() < CANCEL_FRACTION
        greedy = rng.random() < 0.5
        api = rng.choice(["chat", "completion"])
        sample_seed = rng.randrange(2**31)
        prompt = _long_prompt(rng, questions) if rng.random() < 0.15 else rng.choice(questions)
        specs.append(RequestSpec(
            index=i,
            api=api,
            prompt=prompt if api == "chat" else chat(tokenizer, [prompt])[0],
            stream=cancel or rng.random() < 0.5,
            max_tokens=rng.randint(*long_tokens) if cancel or rng.random() < 0.5 else rng.randint(1, 32),
            temperature=0.0 if greedy else 0.8,
            seed=None if greedy else sample_seed,
            cancel_after=rng.randint(2, 6) if cancel else None,
        ))
    return specs


def _long_prompt(rng: random.Random, questions: list[str]) -> str:
    parts: list[str] = []
    for q in rng.sample(questions, len(questions)):
        if sum(map(len, parts)) + len(q) > PROMPT_CHARS_LONG:
            break
        parts.append(q)
    return "Answer each of these questions in turn.\n\n" + "\n\n".join(parts)


# ----------------------------------------------------------------------------- client
@dataclass
class Result:
    index: int
    status: str = "completed"  # completed | aborted (closed by us) | error | hung
    http_status: int | None = None
    error: str | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    chunks: int = 0  # streamed chunks that carried tokens
    ttft_s: float | None = None  # streamed requests: time to the first token
    e2e_s: float | None = None


async def send(client: httpx.AsyncClient, url: str, model: str, spec: RequestSpec) -> Result:
    """One request; a streamed one is closed after ``spec.cancel_after`` chunks with tokens."""
    res, t0 = Result(spec.index), time.perf_counter()
    try:
        if spec.stream:
            await _stream(client, url + spec.path, spec, spec.body(model), res, t0)
        else:
            r = await client.post(url + spec.path, json=spec.body(model))
            res.http_status = r.status_code
            if r.status_code != 200:
                res.status, res.error = "error", r.text[:500]
            else:
                choice = r.json()["choices"][0]
                res.token_ids = choice.get("token_ids") or []
                res.text = choice["message"]["content"] if spec.api == "chat" else choice["text"]
                res.finish_reason = choice.get("finish_reason")
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        res.status, res.error = "error", f"{type(e).__name__}: {e}"
    res.e2e_s = time.perf_counter() - t0
    return res


async def _stream(client, url: str, spec: RequestSpec, body: dict, res: Result, t0: float) -> None:
    done = False
    async with client.stream("POST", url, json=body) as r:
        res.http_status = r.status_code
        if r.status_code != 200:
            res.status, res.error = "error", (await r.aread()).decode(errors="replace")[:500]
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                res.status, res.error = "error", json.dumps(chunk["error"])[:500]
                return
            for choice in chunk.get("choices", []):
                ids = choice.get("token_ids") or []
                text = choice.get("text") if spec.api == "completion" else \
                    (choice.get("delta") or {}).get("content")
                if ids and res.ttft_s is None:
                    res.ttft_s = time.perf_counter() - t0
                res.chunks += bool(ids)
                res.token_ids += ids
                res.text += text or ""
                res.finish_reason = choice.get("finish_reason") or res.finish_reason
            if spec.cancel_after and res.chunks >= spec.cancel_after and not res.finish_reason:
                res.status = "aborted"
                return  # leaving the `async with` closes the connection: vLLM aborts the request
    if not done or res.finish_reason is None:
        res.status, res.error = "error", "stream ended without finish_reason and [DONE]"


async def run_requests(url: str, model: str, specs: list[RequestSpec], concurrency: int,
                       timeout: float, desc: str | None = None) -> list[Result]:
    """All of ``specs`` at most ``concurrency`` at a time; a request past ``timeout`` is hung."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    bar = tqdm(total=len(specs), desc=desc, disable=desc is None, dynamic_ncols=True)

    async def one(client, spec):
        async with sem:
            try:
                res = await asyncio.wait_for(send(client, url, model, spec), timeout)
            except asyncio.TimeoutError:
                res = Result(spec.index, "hung", error=f"no answer within {timeout:.0f} s")
            bar.update()
            return res

    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        results = await asyncio.gather(*(one(client, s) for s in specs))
    bar.close()
    return list(results)


# ----------------------------------------------------------------------------- checks
def compare_greedy(results: list[Result], references: dict[int, Result]) -> list[dict]:
    """Greedy Medusa outputs vs the no-speculation replays (by request index): a completed request
    must be identical, a cancelled one a prefix. Returns the mismatches."""
    bad = []
    for res in results:
        ref = references.get(res.index)
        if ref is None or ref.status != "completed" or res.status not in ("completed", "aborted"):
            continue
        want = ref.token_ids if res.status == "completed" else ref.token_ids[: len(res.token_ids)]
        if res.token_ids != want:
            at = next((k for k, (a, b) in enumerate(zip(res.token_ids, want)) if a != b),
                      min(len(res.token_ids), len(want)))
            bad.append({"index": res.index, "status": res.status, "first_difference": at,
                        "medusa": res.token_ids[at:at + 8], "no_spec": want[at:at + 8]})
    return bad


def settle(server: Server, timeout: float = 60) -> dict[str, float]:
    """Metrics once nothing runs or waits and the KV cache is empty, or at ``timeout``; empty
    when the server does not answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            m = server.metrics()
        except httpx.HTTPError:
            return {}
        idle = m.get("vllm:num_requests_running", 0) == 0 and m.get("vllm:num_requests_waiting", 0) == 0
        if (idle and m.get("vllm:kv_cache_usage_perc", 0) == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.5)


def kv_blocks_leaked(metrics: dict[str, float]) -> int | None:
    """KV blocks still held (usage is a fraction of the blocks other than vLLM's null block);
    None without metrics."""
    if "vllm:kv_cache_usage_perc" not in metrics or "num_gpu_blocks" not in metrics:
        return None
    return round(metrics["vllm:kv_cache_usage_perc"] * (metrics["num_gpu_blocks"] - 1))


def still_serves(server: Server, model: str) -> bool:
    """``/health`` answers 200 and so does a new request."""
    probe = RequestSpec(-1, "completion", "The capital of France is", stream=False, max_tokens=4)
    res = asyncio.run(run_requests(server.url, model, [probe], 1, 60))[0]
    return server.healthy() and res.status == "completed"


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)


@dataclass
class LoadReport:
    specs: list[RequestSpec]
    results: list[Result]  # Medusa server, by request
    references: dict[int, Result]  # no-speculation replays of the greedy requests, by index
    mismatches: list[dict]
    metrics: dict[str, float]  # Medusa server's /metrics after the load drained
    healthy_after: bool
    wall_s: float

    def count(self, status: str, results: list[Result] | None = None) -> int:
        return sum(r.status == status for r in (self.results if results is None else results))

    def greedy_compared(self) -> int:
        refs = self.references
        return sum(r.status in ("completed", "aborted") and refs[r.index].status == "completed"
                   for r in self.results if r.index in refs)

    def summary(self) -> dict:
        m, done = self.metrics, [r for r in self.results if r.status == "completed"]
        drafts = m.get("vllm:spec_decode_num_drafts_total", 0)
        tokens = sum(len(r.token_ids) for r in self.results)
        summary = {
            "requests": len(self.results), "completed": len(done),
            "aborted": self.count("aborted"), "errors": self.count("error"),
            "hung": self.count("hung"), "greedy_compared": self.greedy_compared(),
            "mismatched_greedy": len(self.mismatches),
            "reference_errors": len(self.references) - self.count("completed", [*self.references.values()]),
            "kv_blocks_leaked": kv_blocks_leaked(m),
            "requests_running_after": m.get("vllm:num_requests_running"),
            "healthy_after": self.healthy_after,
            "ttft_p50_s": percentile([r.ttft_s for r in self.results if r.ttft_s is not None], 50),
            "ttft_p90_s": percentile([r.ttft_s for r in self.results if r.ttft_s is not None], 90),
            "e2e_p50_s": percentile([r.e2e_s for r in done], 50),
            "e2e_p90_s": percentile([r.e2e_s for r in done], 90),
            "output_tokens": tokens, "load_wall_s": self.wall_s,
            "output_tokens_per_s": tokens / self.wall_s if self.wall_s else None,
            "mean_accepted_length": 1 + m.get("vllm:spec_decode_num_accepted_tokens_total", 0) / drafts
            if drafts else None,
        }
        summary["passed"] = (summary["errors"] == summary["hung"] == summary["mismatched_greedy"]
                             == summary["reference_errors"] == summary["kv_blocks_leaked"] == 0
                             and summary["requests_running_after"] == 0 and self.healthy_after)
        return summary

    def rows(self) -> list[dict]:
        bad = {b["index"]: b for b in self.mismatches}
        rows = []
        for spec, res in zip(self.specs, self.results):
            row = {k: v for k, v in asdict(spec).items() if k not in ("prompt", "extra")}
            row.update(prompt_chars=len(spec.prompt), status=res.status, http_status=res.http_status,
                       tokens=len(res.token_ids), finish_reason=res.finish_reason,
                       ttft_s=res.ttft_s, e2e_s=res.e2e_s, error=res.error,
                       greedy_match=None if res.index not in self.references
                       else res.index not in bad, mismatch=bad.get(res.index))
            rows.append(row)
        return rows


def run_load(medusa: Server, base: Server, model: str, specs: list[RequestSpec], concurrency: int,
             timeout: float, progress: bool = True, overlap: bool = False) -> LoadReport:
    """The load on the Medusa server and every greedy request replayed whole (no cancelling) on
    the no-speculation server: after it, or at the same time with ``overlap`` (faster, but the
    servers share the machine, so latencies are not Medusa's alone). Then Medusa's state."""
    replay = [replace(s, cancel_after=None) for s in specs if s.greedy]

    async def medusa_load():
        t0 = time.perf_counter()
        res = await run_requests(medusa.url, model, specs, concurrency, timeout,
                                 "medusa" if progress else None)
        return res, time.perf_counter() - t0

    async def both():
        refs = run_requests(base.url, model, replay, concurrency, timeout,
                            "no-spec replay" if progress else None)
        if overlap:
            return await asyncio.gather(medusa_load(), refs)
        return await medusa_load(), await refs

    (results, wall), refs = asyncio.run(both())
    metrics = settle(medusa)
    healthy = still_serves(medusa, model)
    references = {r.index: r for r in refs}
    return LoadReport(specs, results, references, compare_greedy(results, references), metrics,
                      healthy, wall)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=300, help="per request, seconds")
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    ap.add_argument("--heads", default="medusa_vllm")
    ap.add_argument("--tree", default="sparse-7")
    ap.add_argument("--acceptance", default="rejection")
    ap.add_argument("--serve-args", default=" ".join(CPU_SERVE_ARGS),
                    help="vllm serve arguments shared by both servers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--log-dir", default=None, help="server logs (default: a new temp folder)")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    import tempfile

    from medusa_vllm.bundled import bundled_model_path

    args = parse_args(argv)
    model = args.model or str(bundled_model_path())
    specs = build_workload(args.requests, model, args.seed)
    spec_config = json.dumps({"tree": args.tree, "acceptance": args.acceptance})
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="serve_load_"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the servers are stopped
    t0 = time.perf_counter()
    with ExitStack() as stack:
        medusa, base = start_servers(model, ["--speculative-model", args.heads, "--speculative-config",
                                             spec_config], log_dir, stack, args.serve_args.split(),
                                     args.start_timeout)
        start_s = time.perf_counter() - t0
        report = run_load(medusa, base, model, specs, args.concurrency, args.timeout)
    summary = report.summary() | {"servers_start_s": start_s, "total_s": time.perf_counter() - t0}
    config = vars(args) | {"model": model, "medusa_command": medusa.command,
                           "no_spec_command": base.command, "log_dir": str(log_dir)}
    out = Path(args.out) if args.out else RESULTS / f"serve_load_{device_tag()}.json"
    write_envelope(out, "serve_load", config, report.rows(), summary)
    for key, value in summary.items():
        print(f"{key:>24}: {value:.3f}" if isinstance(value, float) else f"{key:>24}: {value}")
    for bad in report.mismatches[:10]:
        print("greedy mismatch:", bad)
    print(f"-> {out}  (server logs: {log_dir})")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
