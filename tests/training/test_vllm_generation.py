"""Self-distillation through a real vLLM engine (CPU, fp32, eager): greedy answers equal the
base model's own greedy continuation. Slow (~1 min, mostly engine start): marked vllm."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.dataset import read_examples

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[2]


def test_generate_matches_greedy_decoding(tmp_path, bundled_model_dir):
    pytest.importorskip("vllm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2+2?", "split": "train"}) + "\n"
                       + json.dumps({"prompt": "Name a color.", "split": "heldout"}) + "\n")
    out = tmp_path / "data.jsonl"
    cmd = [sys.executable, "-m", "training.data", "generate", "--model", str(bundled_model_dir),
           "--out", str(out), "--prompts-file", str(prompts), "--max-tokens", "8", "--dtype", "float32",
           "--enforce-eager", "--gpu-memory-utilization", "0.15", "--max-num-seqs", "2",
           "--max-prompt-tokens", "128"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    examples = read_examples(out)
    assert [e.split for e in examples] == ["train", "heldout"]
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    assert meta["examples"] == 2 and meta["generated_tokens"] == sum(e.spans[0][1] - e.spans[0][0] for e in examples)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medusa_vllm.reference import greedy_decode
    from training.conversations import encode_chat

    tok = AutoTokenizer.from_pretrained(bundled_model_dir)
    model = AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32).eval()
    for ex, q in zip(examples, ["What is 2+2?", "Name a color."]):
        assert ex.prompt_ids == encode_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True)
        answer = ex.input_ids[ex.spans[0][0]:ex.spans[0][1]]
        assert answer == greedy_decode(model, [ex.prompt_ids], 8, eos_token_id=tok.eos_token_id)[0]
