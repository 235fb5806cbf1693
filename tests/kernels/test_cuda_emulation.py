"""The CUDA kernels' logic on a CPU: csrc/tree_attention_cuda.cuh, move_accepted_kv.cuh,
target_probs_cuda.cuh and rejection_walk_cuda.cuh run
through tests/kernels/cuda_emulation (one fiber per CUDA thread, deferred cp.async, ldmatrix /
mma.m16n8k16 / shfl assembled from the 32 lanes per the PTX fragment layouts, NaN-filled shared
memory and workspace, bounds checks on shared and global reads).

It checks indexing, tiling, masking, the pipeline order and the split-KV merge; not the
hardware itself, timing or the real PTX (tests with device "cuda" do that on a GPU).
Opt-in (a ~30 s g++ build, then ~1.5 minutes; `make test` opts in): MEDUSA_VLLM_EMULATION_TESTS=1 pytest tests/kernels
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

from medusa_vllm import kernels
from medusa_vllm.kernels import testing as kt

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent

pytestmark = pytest.mark.skipif(
    os.environ.get("MEDUSA_VLLM_EMULATION_TESTS") != "1", reason="opt-in: MEDUSA_VLLM_EMULATION_TESTS=1"
)
TOLERANCES = {torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


def cuda_include_dir() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [os.path.join(p, "include") for p in (CUDA_HOME, "/usr/local/cuda") if p]
    try:
        import nvidia.cu13 as cu13  # the CUDA headers of torch's pip dependencies

        candidates.append(os.path.join(list(cu13.__path__)[0], "include"))
    except ImportError:
        pass
    return next((c for c in candidates if os.path.exists(os.path.join(c, "cuda_bf16.h"))), None)


@pytest.fixture(scope="module")
def emu():
    from torch.utils.cpp_extension import load

    include = cuda_include_dir()
    if include is None:
        pytest.skip("no cuda_bf16.h for the host-side bf16/fp16 types")
    build = REPO / "build" / "cuda_emulation"
    build.mkdir(parents=True, exist_ok=True)
    return load(name="medusa_vllm_cuda_emulation", sources=[str(HERE / "cuda_emulation" / "emulator.cpp")],
                extra_include_paths=[str(REPO / "csrc"), str(HERE / "cuda_emulation"), include],
                extra_cflags=["-O2", "-std=c++17", "-DMEDUSA_VLLM_CUDA_EMULATION"], build_directory=str(build))


def check(emu, p: kt.TreeAttentionProblem, splits: int, tile: str = "auto", softcap: float = 0.0):
    expected = p.out.clone()
    kernels.tree_attention_ref(expected, *p.args()[1:], p.scale, softcap)
    emu.tree_attention(p.out, *p.args()[1:], p.scale, softcap, splits, tile)
    atol, rtol = TOLERANCES[p.q.dtype]
    torch.testing.assert_close(p.out, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("tree", ["chain", "medusa", "star"])
@pytest.mark.parametrize("block_size", [16, 48, 128])  # 48: the non-power-of-two path
@pytest.mark.parametrize("tile", ["small", "large"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_trees_tiles_block_sizes(emu, tree, block_size, tile, head_dim):
    mask = {"chain": kt.chain_mask(17), "medusa": kt.medusa_mask(63), "star": kt.star_mask(12)}[tree]
    q = mask.shape[0]
    p = kt.make_tree_attention_problem(
        q_lens=[q, 1, 0, q // 2], ctx_lens=[70, 21, 3, 200], tree_ids=[0, 0, 0, 0], masks=[mask], num_q_heads=6,
        num_kv_heads=2, head_dim=head_dim, block_size=block_size, dtype=torch.bfloat16, device="cpu",
        layout="nhd" if block_size != 48 else "cpu_rows", strided_q=True, seed=block_size + head_dim,
    )
    check(emu, p, splits=1, tile=tile)


@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_kv_merge(emu, splits, dtype):
    # 305 keys = 5 tiles of 64 for the second request: with 7 splits of at least one tile each,
    # two of its splits are empty (log2-sum-exp -inf, skipped by the merge).
    p = kt.make_tree_attention_problem(
        q_lens=[17, 5, 0], ctx_lens=[1500, 300, 8], tree_ids=[0, 1, 0], masks=[kt.medusa_mask(16), kt.chain_mask(5)],
        num_q_heads=14, num_kv_heads=2, head_dim=64, block_size=32, dtype=dtype, device="cpu", seed=splits,
    )
    check(emu, p, splits=splits)


def test_a_wave_of_splits_most_of_them_empty(emu):
    # A small batch as the launch splits it: 40 splits (past one lane's 32 in the merge). The
    # first request's 364 keys fill 6 one-tile splits and leave 34 empty; the second's 2,230
    # keys (35 tiles) fill 35 one-tile splits, the last three in the merge's second lane round.
    p = kt.make_tree_attention_problem(
        q_lens=[64, 30], ctx_lens=[300, 2200], tree_ids=[0, 0], masks=[kt.medusa_mask(63)], num_q_heads=9,
        num_kv_heads=3, head_dim=64, block_size=16, dtype=torch.bfloat16, device="cpu", seed=40,
    )
    check(emu, p, splits=40)


@pytest.mark.parametrize("heads", [(8, 8), (7, 1), (9, 3)])
def test_gqa_and_two_word_masks(emu, heads):
    gen = torch.Generator().manual_seed(1)
    masks = [kt.random_tree_mask(100, gen), kt.chain_mask(128)]
    p = kt.make_tree_attention_problem(
        q_lens=[100, 128], ctx_lens=[33, 0], tree_ids=[0, 1], masks=masks, num_q_heads=heads[0],
        num_kv_heads=heads[1], head_dim=64, block_size=16, dtype=torch.bfloat16, device="cpu", seed=heads[0],
    )
    check(emu, p, splits=2)


def test_softcap_and_rows_without_keys(emu):
    bits = torch.rand(1, 20, 20, generator=torch.Generator().manual_seed(2)) < 0.4
    bits[0, 4] = False
    p = kt.make_tree_attention_problem(
        q_lens=[20], ctx_lens=[0], tree_ids=[0], masks=list(bits), num_q_heads=2, num_kv_heads=1, head_dim=128,
        block_size=16, dtype=torch.float16, device="cpu",
    )
    p.scale = 0.4
    check(emu, p, splits=1, softcap=4.0)
    assert p.out[4].abs().max() == 0


@pytest.mark.parametrize("splits", [1, 3])
def test_invalid_request_nan_and_padding_untouched(emu, splits):
    p = kt.make_tree_attention_problem(
        q_lens=[9, 9], ctx_lens=[400, 20], tree_ids=[0, 0], masks=[kt.chain_mask(9)], num_q_heads=2,
        num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16, device="cpu",
    )
    q = torch.cat([p.q, torch.randn(4, 2, 64).bfloat16()])
    out = torch.full_like(q, 7.0)
    p.req_tree_ids[1] = 3
    emu.tree_attention(out, q, *p.args()[2:], p.scale, 0.0, splits, "auto")
    assert not out[:9].isnan().any() and out[9:18].isnan().all() and (out[18:] == 7).all()


@pytest.mark.parametrize("unit_bytes", [16, 4, 2])
@pytest.mark.parametrize("layout", kt.UNIT_STRIDE_LAYOUTS)
def test_move_accepted_kv(emu, unit_bytes, layout):
    gen = torch.Generator().manual_seed(unit_bytes)
    block_size, num_blocks, q_lens, ctx = 16, 24, [9, 0, 30, 4], [3, 0, 17, 40]
    seq_lens = [c + q for c, q in zip(ctx, q_lens)]
    table = kt.make_block_table(seq_lens, block_size, num_blocks, gen)
    slots, qsl = [], [0]
    for b, (c, q) in enumerate(zip(ctx, q_lens)):
        slots += kt.slots_of(table, b, range(c, c + q), block_size)
        qsl.append(qsl[-1] + q)
    accepted = torch.tensor([[2, 5, 6, -1], [-1] * 4, [1, 9, 17, 29], [-1, 1, 2, 3]], dtype=torch.int32)
    caches = [kt.make_kv_cache(num_blocks, block_size, 2, 64, torch.bfloat16, "cpu", layout, gen) for _ in range(3)]
    args = (torch.tensor(slots), torch.tensor(qsl, dtype=torch.int32), accepted)
    before = [c.storage.clone() for c in caches]
    emu.move_accepted_kv([c.k for c in caches], [c.v for c in caches], *args, unit_bytes)
    got = [c.storage.clone() for c in caches]
    for c, b in zip(caches, before):
        c.storage.copy_(b)
    kernels.move_accepted_kv_ref([c.k for c in caches], [c.v for c in caches], *args)
    for g, c, b in zip(got, caches, before):
        assert torch.equal(g, c.storage) and not torch.equal(g, b)


def _target_rows(m: int, vocab: int, seed: int):
    """Rows of bf16-valued logits (ties in groups) and per-row filters, every mix of on and off."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(m)
    scale = torch.tensor([0.5, 2.0, 6.0])[idx % 3].unsqueeze(1)
    x = (torch.randn(m, vocab, generator=g) * scale).to(torch.bfloat16).float()
    temp = torch.tensor([1.0, 0.8, 0.3, 1.7])[idx % 4]
    k = torch.tensor([vocab, 1, 20, 0, 200, 7, 3], dtype=torch.int32)[idx % 7]
    p = torch.tensor([1.0, 1.0, 0.9, 0.5, 0.95, 0.99, 0.3, 0.0, 0.999])[idx % 9]
    min_p = torch.tensor([0.0, 0.0, 0.05, 0.0, 0.2])[idx % 5]
    return x, temp, k, p, min_p


def test_target_probs_kernel_matches_the_cpu_op(emu):
    """The CUDA kernel's thresholds, tie ranks (block scan over the 8-token layout), the top-k
    ties taken off top-p's bins, and the kept mass: the same tokens as the CPU op and the
    reference, probabilities within float rounding (the GPU sums in a tree)."""
    x, temp, k, p, min_p = _target_rows(63, 2500, seed=0)
    x[5, 100:] = float("-inf")
    x[8] = 0.0  # one tie of the whole row
    for args in [(k, p, min_p), (k, None, None), (None, p, None), (None, None, None)]:
        got = emu.target_probs(x, temp, *args)
        cpu = kernels.target_probs(x, temp, *args)
        assert torch.equal(got > 0, cpu > 0), f"kept sets differ in {(got > 0).ne(cpu > 0).sum(dim=1).tolist()}"
        torch.testing.assert_close(got, cpu, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(got, kernels.target_probs_ref(x, temp, *args), rtol=1e-5, atol=1e-9)
    # three 8,192-token tiles (tie ranks carried across tiles) and a vocabulary not a multiple of 8;
    # integer logits: ties of hundreds of tokens at every boundary
    x, temp, k, p, min_p = _target_rows(7, 20003, seed=1)
    x = (x * 2).round()
    got = emu.target_probs(x, temp, k, p, min_p)
    want = kernels.target_probs(x, temp, k, p, min_p)
    assert torch.equal(got > 0, want > 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    nan_row = emu.target_probs(torch.full((1, 300), float("-inf")), torch.ones(1), None, None, None)
    assert torch.isnan(nan_row).all()


def test_rejection_walk_kernel_matches_the_cpu_op(emu):
    """The CUDA walk (a block per request: the online max and normaliser, the argmax of greedy
    rows, target_probs' filter passes with top-k / top-p / min-p, children tied at a filter's
    boundary ranked by id, the final draw by a block scan over 8-token tiles, several tiles)
    gives the CPU op's paths and tokens (fixed-point masses: the same draw whatever the
    summation order)."""
    args = kt.walk_problem(24, 20003, seed=0)
    _same_walk(emu.rejection_walk(*args), kernels.rejection_walk(*args))
    args = kt.walk_problem(24, 20003, seed=2, filters=True)
    _same_walk(emu.rejection_walk(*args), kernels.rejection_walk(*args))
    # integer logits: hundreds of tokens tied at every filter boundary, children among them
    args = list(kt.walk_problem(42, 2500, seed=3, filters=True))
    args[0] = (args[0] * 2).round()
    _same_walk(emu.rejection_walk(*args), kernels.rejection_walk(*args))
    _same_walk(kernels.rejection_walk(*args), kernels.rejection_walk_ref(*args))
    args = kt.walk_problem(40, 700, seed=1, trees=("sparse-15",))
    _same_walk(emu.rejection_walk(*args), kernels.rejection_walk(*args))
    logits = args[0].clone()
    logits[args[1][:, 0].clamp_min(0)] = float("-inf")  # rows without mass: token 0, nothing accepted
    got = emu.rejection_walk(logits, *args[1:])
    assert (got[0] == -1).all() and (got[2] == 0).all()


def _same_walk(got, want):
    for name, a, b in zip(("accepted", "last_node", "final"), got, want):
        assert torch.equal(a, b), f"{name} differs at {(a != b).reshape(a.shape[0], -1).any(1).nonzero()[:, 0].tolist()}"
