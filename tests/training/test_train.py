"""python -m training.train end to end on CPU: Medusa-1 on the bundled SmolLM2 (loss falls, heads
save / load / export), resumption replays the same steps, Medusa-2 trains the base after the
heads' warm-up at a lower LR, and the evaluation counts match a full-logits reference."""
import json

import pytest
import torch

from medusa_vllm.checkpoint import load_heads, load_lm_head_weight
from training import loop
from training.train import main as train_main

TINY = ["--batch-tokens", "64", "--log-every", "1", "--no-progress", "--lr", "1e-2"]


def read_log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_medusa1_bundled_model_end_to_end(tmp_path, bundled_model_dir, smol_data):
    out, fd = tmp_path / "out", tmp_path / "fd"
    train_main(["--data", str(smol_data), "--output-dir", str(out), "--max-steps", "20", "--epochs", "100",
                "--batch-tokens", "32", "--lr", "3e-3", "--log-every", "5", "--no-progress",
                "--eval-topk", "10", "--tree-nodes", "15", "--export-fasterdecoding", str(fd)])
    log = read_log(out)
    first, last = sum(log[0]["loss"]) / 4, sum(log[-1]["loss"]) / 4
    assert [r["step"] for r in log] == [5, 10, 15, 20] and last < first / 3, (first, last)
    heads = load_heads(out / "heads", dtype=torch.float32)
    cfg = heads.config
    assert (cfg.num_heads, cfg.num_layers, cfg.own_lm_heads) == (4, 1, False)
    assert len(cfg.tree) == 15 and len(cfg.head_accuracies) == 4 and len(cfg.head_accuracies[0]) == 10
    assert (out / "heads" / "medusa_heads.safetensors").stat().st_size < 4 * 2**20  # no vocab projection
    exported = load_heads(fd, dtype=torch.float32)  # FasterDecoding layout: same logits
    weight = load_lm_head_weight(bundled_model_dir).float()
    x = torch.randn(3, cfg.hidden_size)
    torch.testing.assert_close(exported.logits(x, weight), heads.logits(x, weight))
    report = json.loads((out / "training.json").read_text())
    assert report["benchmark"] == "training" and report["device"].startswith("cpu")
    assert set(report["summary"]) >= {"heads", "head_top1_acc", "mean_accepted_length_greedy",
                                      "peak_mem_fused_vs_naive", "train_tokens_per_s", "device"}
    assert report["summary"]["head_top1_acc"] == [a[0] for a in cfg.head_accuracies]


def test_resume_continues_from_the_same_step(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    args = ["--model", str(tiny_model_dir), "--data", str(tiny_data), "--max-steps", "10",
            "--epochs", "10", "--save-every", "5", *TINY]
    train_main([*args, "--output-dir", str(tmp_path / "straight")])

    real_step = loop.Trainer._step

    def crash_at_6(self, step, batch):
        if step == 6:
            raise KeyboardInterrupt("simulated preemption")
        return real_step(self, step, batch)

    monkeypatch.setattr(loop.Trainer, "_step", crash_at_6)
    with pytest.raises(KeyboardInterrupt):
        train_main([*args, "--output-dir", str(tmp_path / "resumed")])
    monkeypatch.setattr(loop.Trainer, "_step", real_step)
    train_main([*args, "--output-dir", str(tmp_path / "resumed"), "--resume"])

    steps = [r["step"] for r in read_log(tmp_path / "resumed")]
    assert steps == [1, 2, 3, 4, 5, 6, 6, 7, 8, 9, 10]  # step 6 ran before the crash and again
    a = load_heads(tmp_path / "straight" / "heads").state_dict()
    b = load_heads(tmp_path / "resumed" / "heads").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_log(tmp_path / "straight")[-1]["loss"] == read_log(tmp_path / "resumed")[-1]["loss"]


def test_resume_refuses_changed_settings(tmp_path, tiny_model_dir, tiny_data):
    args = ["--model", str(tiny_model_dir), "--data", str(tiny_data), "--max-steps", "2",
            "--output-dir", str(tmp_path), *TINY]
    train_main(args)
    with pytest.raises(SystemExit, match="medusa_num_heads was 4, now 3"):
        train_main([*args, "--resume", "--medusa-num-heads", "3"])


def test_medusa2_trains_the_base_after_the_heads_warmup(tmp_path, tiny_model_dir, tiny_data):
    from transformers import AutoModelForCausalLM

    def run(out, steps):
        train_main(["--model", str(tiny_model_dir), "--data", str(tiny_data), "--output-dir", str(out),
                    "--no-medusa-only-heads", "--warmup-heads-steps", "3", "--max-steps", str(steps),
                    "--base-lr", "1e-3", "--warmup-steps", "1", "--gradient-checkpointing", *TINY])
        return AutoModelForCausalLM.from_pretrained(out / "base_model", dtype=torch.float32).state_dict()

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    original = {k: v.to(torch.bfloat16).float() for k, v in original.items()}  # saved in bf16
    frozen, trained = run(tmp_path / "warmup_only", 3), run(tmp_path / "joint", 6)
    assert all(torch.equal(frozen[k], original[k]) for k in original)  # heads' warm-up: base untouched
    changed = [k for k in original if not torch.equal(trained[k], original[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.embed_tokens.weight" in changed
    log = read_log(tmp_path / "joint")
    assert [r["lr_base"] for r in log[:3]] == [0.0, 0.0, 0.0]
    assert all(0 < r["lr_base"] < r["lr"] for r in log[3:])
    assert len(log[0]["loss"]) == 5  # base + 4 heads
    heads = load_heads(tmp_path / "joint" / "heads")
    assert heads.config.base_model == str(tmp_path / "joint" / "base_model")


def test_accuracy_matches_full_logits(tiny_model_dir, tiny_data):
    from medusa_vllm.heads import MedusaHeads, MedusaHeadsConfig
    from training.batching import collate
    from training.dataset import IGNORE, label_offsets, read_examples
    from training.distributed import DistInfo
    from training.evaluate import measure_accuracy
    from training.model import LossConfig, MedusaTrainModel, load_base

    base = load_base(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"), trainable=False)
    heads = MedusaHeads(MedusaHeadsConfig(32, 256, num_heads=3))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.3)
    model = MedusaTrainModel(base, heads, LossConfig(chunk_size=7), torch.float32)
    examples = read_examples(tiny_data)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    report = measure_accuracy(model, 3, examples, info, batch_tokens=100, topk=4)
    hits, counts = torch.zeros(4, 4), torch.zeros(4)  # [column, k]; column 0 = base
    for ex in examples:
        b = collate([ex], label_offsets(3, with_base=True))
        with torch.no_grad():
            h = model.base_hidden(b.input_ids, b.attention_mask)[0]  # [T, H]
            logits = torch.cat([(h @ base.lm_head.weight.T)[:, None], heads.logits(h, base.lm_head.weight)], 1)
        for g in range(4):
            t = b.labels[0, :, g]
            keep = t != IGNORE
            top = logits[keep, g].topk(4, dim=-1).indices
            hits[g] += torch.stack([(top[:, : j + 1] == t[keep, None]).any(1).sum() for j in range(4)])
            counts[g] += keep.sum()
    expected = hits / counts[:, None]
    torch.testing.assert_close(torch.tensor(report.topk, dtype=torch.float32), expected[1:])
    assert report.base_top1 == pytest.approx(float(expected[0, 0]))
    assert report.tokens == counts[1:].long().tolist()


def test_evaluate_cli_measures_tau_and_writes_the_tree(tmp_path, tiny_model_dir, tiny_data):
    from training.evaluate import main as evaluate_main

    out = tmp_path / "run"
    train_main(["--model", str(tiny_model_dir), "--data", str(tiny_data), "--output-dir", str(out),
                "--max-steps", "3", "--eval-tau-prompts", "2", "--eval-tau-max-new-tokens", "6", *TINY])
    summary = json.loads((out / "training.json").read_text())["summary"]
    assert summary["heads"] == "heads" and summary["mean_accepted_length_greedy"] >= 1.0
    evaluate_main(["--model", str(tiny_model_dir), "--heads", str(out / "heads"), "--data", str(tiny_data),
                   "--tau-prompts", "2", "--max-new-tokens", "6", "--tree-nodes", "7", "--topk", "3",
                   "--write-tree", "--out", str(tmp_path / "eval.json")])
    result = json.loads((tmp_path / "eval.json").read_text())
    taus = [r for r in result["rows"] if r["kind"] == "tau"]
    assert [t["tree"] for t in taus] == ["default-63", "calibrated-7"]
    assert all(t["tau"] >= 1.0 and t["steps"] > 0 and t["tau_estimate"] >= 1.0 for t in taus)
    cfg = load_heads(out / "heads").config
    assert len(cfg.tree) == 7 and cfg.tree == result["calibrated_tree"]
    assert cfg.head_accuracies == result["topk"] and len(cfg.head_accuracies[0]) == 3


def test_own_lm_heads_train_their_projection(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "own"
    train_main(["--model", str(tiny_model_dir), "--data", str(tiny_data), "--output-dir", str(out),
                "--own-lm-heads", "--max-steps", "3", *TINY])
    heads = load_heads(out / "heads", dtype=torch.float32)
    base = load_lm_head_weight(tiny_model_dir).float()
    assert heads.config.own_lm_heads and len(heads.lm_heads) == 4
    assert all(not torch.allclose(h.weight, base) for h in heads.lm_heads)  # initialised from it, then trained
