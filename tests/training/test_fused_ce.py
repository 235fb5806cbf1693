"""training.fused_ce against F.cross_entropy on materialized logits: loss, grad_hidden,
grad_weight, top-k counts; chunking edge cases; fp32 (tight) and bf16 (loose) tolerances."""
import pytest
import torch
import torch.nn.functional as F

from training.fused_ce import FusedCEOutput, default_chunk_size, fused_linear_cross_entropy

H, V = 16, 50


def naive(hidden, weight, target, weights, topk=1):
    """Reference on full logits, in float64: (loss, correct [G, topk], num_valid [G])."""
    h, w = hidden.double(), weight.double()
    if h.dim() == 2:
        h, target = h[:, None], target[:, None]
    logits = h @ w.T  # [N, G, V]
    loss, correct, valid = 0.0, [], []
    for g, wg in enumerate(weights):
        t = target[:, g]
        keep = t != -100
        if keep.any():
            loss = loss + wg * F.cross_entropy(logits[:, g], t, ignore_index=-100)
        rank = (logits[:, g][keep] > logits[:, g][keep].gather(1, t[keep, None])).sum(1)
        correct.append([(rank < j + 1).sum().item() for j in range(topk)])
        valid.append(int(keep.sum()))
    return loss, torch.tensor(correct), torch.tensor(valid)


def inputs(n, groups, dtype=torch.float32, ignore_every=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, H) if groups == 0 else (n, groups, H)
    hidden = torch.randn(*shape, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) * 0.5).to(dtype).requires_grad_()
    target = torch.randint(0, V, shape[:-1], generator=gen)
    if ignore_every:
        target.view(-1)[::ignore_every] = -100
    return hidden, weight, target


def grads(loss, hidden, weight):
    hidden.grad = weight.grad = None
    loss.backward()
    return hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 10_000])  # 10_000 > N; 7 does not divide N
@pytest.mark.parametrize("groups", [0, 3])  # 0: plain [N, H]
def test_matches_naive_fp32(chunk, groups):
    hidden, weight, target = inputs(37, groups, ignore_every=4)
    weights = [1.0] if groups == 0 else [1.0, 0.8, 0.64]
    out = fused_linear_cross_entropy(hidden, weight, target, group_weights=weights if groups else None,
                                     chunk_size=chunk, topk=5)
    gh, gw = grads(out.loss, hidden, weight)
    ref, correct, valid = naive(hidden, weight, target, weights, topk=5)
    rh, rw = grads(ref, hidden, weight)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, rh.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw.float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(out.correct, correct) and torch.equal(out.num_valid, valid)


@pytest.mark.parametrize("chunk", [5, 64])
def test_matches_naive_bf16(chunk):
    hidden, weight, target = inputs(64, 4, dtype=torch.bfloat16, ignore_every=5)
    weights = [0.8 ** k for k in range(4)]
    out = fused_linear_cross_entropy(hidden, weight, target, group_weights=weights, chunk_size=chunk)
    gh, gw = grads(out.loss, hidden, weight)
    ref, _, _ = naive(hidden, weight, target, weights)  # exact math on the same bf16 inputs
    rh, rw = grads(ref, hidden, weight)
    assert gh.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gh.float(), rh.float(), rtol=3e-2, atol=2e-3)
    torch.testing.assert_close(gw.float(), rw.float(), rtol=3e-2, atol=2e-3)


def test_ignored_rows_and_ignored_blocks_get_zero_grad():
    hidden, weight, target = inputs(40, 0)
    target[8:30] = -100  # a block longer than a chunk: whole chunks without a target
    out = fused_linear_cross_entropy(hidden, weight, target, chunk_size=4)
    gh, _ = grads(out.loss, hidden, weight)
    assert torch.count_nonzero(gh[8:30]) == 0 and torch.count_nonzero(gh[:8]) > 0
    ref, _, _ = naive(hidden, weight, target, [1.0])
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-6, atol=1e-6)


def test_all_ignored_group_contributes_zero():
    hidden, weight, target = inputs(12, 2)
    target[:, 1] = -100
    out = fused_linear_cross_entropy(hidden, weight, target, group_weights=[1.0, 5.0], chunk_size=5)
    assert out.num_valid.tolist() == [12, 0] and out.group_loss[1] == 0 and out.correct[1].sum() == 0
    ref = F.cross_entropy(hidden[:, 0].double() @ weight.double().T, target[:, 0])
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-6, atol=1e-6)
    target[:, 0] = -100  # nothing valid at all: loss 0, zero gradients
    out = fused_linear_cross_entropy(hidden, weight, target, group_weights=[1.0, 5.0])
    gh, gw = grads(out.loss, hidden, weight)
    assert out.loss == 0 and torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


def test_frozen_weight_and_no_grad():
    hidden, weight, target = inputs(20, 0)
    out = fused_linear_cross_entropy(hidden, weight.detach(), target, chunk_size=6)
    out.loss.backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    F.cross_entropy(ref_hidden @ weight.detach().T, target).backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        out = fused_linear_cross_entropy(hidden, weight, target)
    assert not out.loss.requires_grad
    assert isinstance(out, FusedCEOutput) and out.group_loss.shape == (1,)


def test_group_losses_and_weights():
    hidden, weight, target = inputs(30, 3, ignore_every=4)
    out = fused_linear_cross_entropy(hidden, weight, target, group_weights=[0.0, 1.0, 2.0], chunk_size=8)
    per_group = [F.cross_entropy(hidden[:, g].double() @ weight.double().T, target[:, g]) for g in range(3)]
    torch.testing.assert_close(out.group_loss.double(), torch.stack(per_group), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), per_group[1] + 2 * per_group[2], rtol=1e-6, atol=1e-6)


def test_a_wrong_label_shift_is_caught():
    """The comparison is sharp: shifting the targets by one row changes loss and gradients."""
    hidden, weight, target = inputs(24, 0)
    out = fused_linear_cross_entropy(hidden, weight, target.roll(1), chunk_size=5)
    ref, _, _ = naive(hidden, weight, target, [1.0])
    assert abs(out.loss.item() - ref.item()) > 1e-3


def test_preconditions():
    hidden, weight, target = inputs(8, 0)
    with pytest.raises(ValueError, match="share dtype"):
        fused_linear_cross_entropy(hidden, weight.double(), target)
    with pytest.raises(ValueError, match="targets must lie"):
        fused_linear_cross_entropy(hidden, weight, torch.full_like(target, V))
    with pytest.raises(ValueError, match="target"):
        fused_linear_cross_entropy(hidden, weight, target[:-1])
    with pytest.raises(ValueError, match="group_weights"):
        fused_linear_cross_entropy(hidden, weight, target, group_weights=[1.0, 2.0])
    assert default_chunk_size(128256) == 1024 and default_chunk_size(10**9) == 64


def test_memory_benchmark_smoke(tmp_path):
    """benchmarks/fused_ce_memory.py on a tiny CPU shape: the envelope, and both losses agree."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.fused_ce_memory import main as bench_main

    out = tmp_path / "mem.json"
    summary = bench_main(["--tokens", "64", "--hidden", "32", "--vocab", "512", "--chunk-size", "16",
                          "--dtype", "fp32", "--device", "cpu", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "fused_ce_memory" and doc["summary"] == json.loads(json.dumps(summary))
    assert len(doc["rows"]) == 4 and all(r["loss_rel_diff"] < 1e-5 for r in doc["rows"])
