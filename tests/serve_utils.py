"""Helpers for the `vllm serve` tests: one request at a time through benchmarks/serve_load.py's
client, raw requests for error answers, and a `vllm serve` that is expected to refuse to start."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass

import httpx

from benchmarks.serve_load import RequestSpec, Result, Server, free_port, run_requests, vllm_cli


def request(server: Server, model: str, spec: RequestSpec, timeout: float = 120) -> Result:
    """One request through the load generator's client (streamed or not, token ids returned)."""
    return asyncio.run(run_requests(server.url, model, [spec], 1, timeout))[0]


def post(server: Server, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    """A raw POST (whole response read, streamed or not), for status codes and extra fields."""
    return httpx.post(server.url + path, json=body, timeout=timeout, trust_env=False)


def requests(server: Server, model: str, specs: list[RequestSpec], timeout: float = 120) -> list[Result]:
    """Several requests at once (up to 16 concurrent), results in order."""
    return asyncio.run(run_requests(server.url, model, specs, 16, timeout))


def error_of(r: httpx.Response) -> tuple[int, str]:
    """(code, message) of an error answer: the JSON error body, or for a stream refused after it
    began (an error the engine raises after the 200), its error event."""
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.splitlines():
            if line.startswith("data: {") and '"error"' in line:
                err = json.loads(line[len("data: "):])["error"]
                return err["code"], err["message"]
        return r.status_code, ""
    return r.status_code, r.json()["error"]["message"]


@dataclass
class FailedStart:
    returncode: int | None  # None: still running at the timeout (then killed)
    output: str
    seconds: float

    @property
    def last_line(self) -> str:
        lines = [line for line in self.output.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def serve_expecting_failure(args: list[str], timeout: float = 120) -> FailedStart:
    """`vllm serve ARGS` on a free loopback port, waited for; killed (whole group) at ``timeout``."""
    cmd = [vllm_cli(), "serve", *args, "--host", "127.0.0.1", "--port", str(free_port())]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        out, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, code = proc.communicate()[0], None
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind
    except ProcessLookupError:
        pass
    return FailedStart(code, out, time.monotonic() - t0)
