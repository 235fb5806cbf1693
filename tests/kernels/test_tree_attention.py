"""torch.ops.medusa_vllm.tree_attention against the PyTorch reference (CPU always, CUDA when
available): trees, GQA ratios, head dims, block sizes, both cache layouts, mixed batches."""

from __future__ import annotations

import pytest
import torch

from medusa_vllm import kernels
from medusa_vllm.kernels import testing as kt

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
# (atol, rtol) per (device, dtype). The CUDA kernel rounds P to bf16/fp16 before P V (as
# FlashAttention does); the CPU kernel keeps P in fp32.
TOLERANCES = {
    ("cpu", torch.float32): (2e-5, 1e-5),
    ("cpu", torch.bfloat16): (1e-2, 1e-2),
    ("cpu", torch.float16): (2e-3, 2e-3),
    ("cuda", torch.bfloat16): (3e-2, 2e-2),
    ("cuda", torch.float16): (4e-3, 4e-3),
}
DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.bfloat16, torch.float16]}
TREES = {
    "chain": lambda: kt.chain_mask(17),
    "star": lambda: kt.star_mask(17),
    "medusa63": lambda: kt.medusa_mask(63),
    "random": lambda: kt.random_tree_mask(33, torch.Generator().manual_seed(7)),
}


def check(problem: kt.TreeAttentionProblem, device: str, softcap: float = 0.0, num_splits: int = 0) -> None:
    expected = problem.out.clone()
    kernels.tree_attention_ref(expected, *problem.args()[1:], problem.scale, softcap)
    kernels.tree_attention(problem.out, *problem.args()[1:], problem.scale, softcap, num_splits)
    atol, rtol = TOLERANCES[(device, problem.q.dtype)]
    torch.testing.assert_close(problem.out, expected, atol=atol, rtol=rtol, equal_nan=False)


def dtype_params():
    return [pytest.param(d, dt, marks=CUDA if d == "cuda" else ()) for d in DTYPES for dt in DTYPES[d]]


@pytest.mark.parametrize("device,dtype", dtype_params())
@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("layout", kt.LAYOUTS)
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_trees_layouts_block_sizes(device, dtype, tree, layout, block_size):
    if device == "cuda" and layout not in kt.UNIT_STRIDE_LAYOUTS:
        pytest.skip("the CUDA kernels take unit-stride head_dim views")
    mask = TREES[tree]()
    q = mask.shape[0]
    # Full tree, a BFS prefix, a decode (q_len 1) and a padded request; contexts off the block grid.
    problem = kt.make_tree_attention_problem(
        q_lens=[q, q // 2 + 1, 1, 0], ctx_lens=[77, 300, 19, 5], tree_ids=[0, 0, 0, 0], masks=[mask],
        num_q_heads=9, num_kv_heads=3, head_dim=64, block_size=block_size, dtype=dtype, device=device,
        layout=layout, seed=block_size,
    )
    check(problem, device)


@pytest.mark.parametrize("device,dtype", dtype_params())
@pytest.mark.parametrize("heads", [(2, 2), (9, 3), (14, 2), (8, 1)], ids=lambda h: f"hq{h[0]}-hkv{h[1]}")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gqa_and_head_dims(device, dtype, heads, head_dim):
    masks = [kt.chain_mask(5), kt.medusa_mask(40)]
    problem = kt.make_tree_attention_problem(
        q_lens=[41, 5, 41], ctx_lens=[130, 64, 0], tree_ids=[1, 0, 1], masks=masks,
        num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim, block_size=16, dtype=dtype,
        device=device, strided_q=True, seed=head_dim,
    )
    check(problem, device)


@pytest.mark.parametrize("device", DEVICES)
def test_several_trees_per_batch_and_two_word_masks(device):
    dtype = DTYPES[device][-1]
    gen = torch.Generator().manual_seed(3)
    masks = [kt.chain_mask(128), kt.random_tree_mask(100, gen), kt.star_mask(70), kt.medusa_mask(63)]
    problem = kt.make_tree_attention_problem(
        q_lens=[128, 100, 70, 64, 3, 0, 99], ctx_lens=[40, 1000, 0, 257, 2, 9, 31], tree_ids=[0, 1, 2, 3, 2, 0, 1],
        masks=masks, num_q_heads=6, num_kv_heads=2, head_dim=64, block_size=32, dtype=dtype, device=device,
        layout="cpu_vec" if device == "cpu" else "cpu_rows", seed=11,
    )
    assert problem.tree_masks.shape == (4, 128, 2)
    check(problem, device)


@pytest.mark.parametrize("device", DEVICES)
def test_arbitrary_bits_and_rows_without_keys(device):
    """The kernel obeys the bits, tree or not: bits past q_len are ignored, and a row that sees
    nothing (no context, no bit) yields zeros."""
    dtype = DTYPES[device][0]
    q_max = 80
    gen = torch.Generator().manual_seed(5)
    bits = torch.rand(2, q_max, q_max, generator=gen) < 0.3
    bits[1, 3] = False  # request 1 has no context: row 3 sees nothing
    problem = kt.make_tree_attention_problem(
        q_lens=[50, 20], ctx_lens=[33, 0], tree_ids=[0, 1], masks=list(bits), num_q_heads=4, num_kv_heads=2,
        head_dim=64, block_size=16, dtype=dtype, device=device, seed=1,
    )
    check(problem, device)
    assert problem.out[50 + 3].abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_softcap_and_scale(device, softcap):
    problem = kt.make_tree_attention_problem(
        q_lens=[17, 9], ctx_lens=[200, 31], tree_ids=[0, 0], masks=[kt.medusa_mask(16)], num_q_heads=4,
        num_kv_heads=2, head_dim=128, block_size=16, dtype=DTYPES[device][0], device=device, seed=2,
    )
    problem.scale = 0.3  # large logits, so the softcap matters
    check(problem, device, softcap=softcap)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [0, 1, 2, 5, 64])
def test_split_kv(device, num_splits):
    """num_splits is a CUDA tuning knob: every value gives the same result (CPU ignores it)."""
    problem = kt.make_tree_attention_problem(
        q_lens=[17, 1, 0, 5], ctx_lens=[3000, 2500, 10, 700], tree_ids=[0, 0, 0, 0], masks=[kt.medusa_mask(16)],
        num_q_heads=14, num_kv_heads=2, head_dim=64, block_size=32, dtype=DTYPES[device][-1], device=device,
        seed=num_splits,
    )
    check(problem, device, num_splits=num_splits)


@pytest.mark.parametrize("device", DEVICES)
def test_padding_tokens_and_strided_out_untouched(device):
    """Rows past query_start_loc[B] (batch padding) are not written; out may be strided."""
    dtype = DTYPES[device][-1]
    problem = kt.make_tree_attention_problem(
        q_lens=[9, 4], ctx_lens=[50, 3], tree_ids=[0, 0], masks=[kt.star_mask(9)], num_q_heads=4, num_kv_heads=2,
        head_dim=64, block_size=16, dtype=dtype, device=device, seed=4,
    )
    n, pad = problem.q.shape[0], 3
    q = torch.cat([problem.q, torch.randn(pad, 4, 64, dtype=dtype, device=device)])
    storage = torch.full((n + pad, 6, 64), 7.0, dtype=dtype, device=device)
    out = storage[:, 1:5]  # strided rows
    expected = out.clone()
    kernels.tree_attention_ref(expected, q, *problem.args()[2:], problem.scale)
    kernels.tree_attention(out, q, *problem.args()[2:], problem.scale)
    atol, rtol = TOLERANCES[(device, dtype)]
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    assert (out[n:] == 7).all() and (storage[:, 0] == 7).all() and (storage[:, 5] == 7).all()


@CUDA
def test_cuda_rejects_non_unit_head_stride():
    problem = kt.make_tree_attention_problem(
        q_lens=[3], ctx_lens=[20], tree_ids=[0], masks=[kt.chain_mask(3)], num_q_heads=2, num_kv_heads=2,
        head_dim=64, block_size=16, dtype=torch.bfloat16, device="cuda", layout="cpu_vec",
    )
    with pytest.raises(ValueError, match="unit stride on head_dim on CUDA"):
        kernels.tree_attention(problem.out, *problem.args()[1:], problem.scale)
    with pytest.raises(RuntimeError, match="unit stride on head_dim on CUDA"):
        torch.ops.medusa_vllm.tree_attention(problem.out, *problem.args()[1:], problem.scale, 0.0, 0)


@CUDA
def test_cuda_invalid_request_gives_nan_rows():
    problem = kt.make_tree_attention_problem(
        q_lens=[9, 9], ctx_lens=[20, 20], tree_ids=[0, 0], masks=[kt.chain_mask(9)], num_q_heads=2,
        num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16, device="cuda",
    )
    problem.req_tree_ids[1] = 5  # no such tree: request 1 is invalid, request 0 is not
    kernels.tree_attention(problem.out, *problem.args()[1:], problem.scale)
    assert problem.out[9:].isnan().all() and not problem.out[:9].isnan().any()


@CUDA
@pytest.mark.parametrize("num_splits", [1, 4])
def test_cuda_graph_replay_follows_seq_lens(num_splits):
    problem = kt.make_tree_attention_problem(
        q_lens=[17, 17], ctx_lens=[900, 400], tree_ids=[0, 0], masks=[kt.medusa_mask(16)], num_q_heads=14,
        num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16, device="cuda",
    )
    call = lambda: kernels.tree_attention(problem.out, *problem.args()[1:], problem.scale, 0.0, num_splits)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    problem.seq_lens.sub_(torch.tensor([37, 250], dtype=torch.int32, device="cuda"))
    graph.replay()
    expected = problem.out.clone()
    kernels.tree_attention_ref(expected, *problem.args()[1:], problem.scale)
    torch.testing.assert_close(problem.out, expected, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_traces_under_torch_compile(device):
    """The fake kernel lets torch.compile trace the op (fullgraph, no graph break)."""
    problem = kt.make_tree_attention_problem(
        q_lens=[5], ctx_lens=[20], tree_ids=[0], masks=[kt.chain_mask(5)], num_q_heads=2, num_kv_heads=1,
        head_dim=64, block_size=16, dtype=DTYPES[device][-1], device=device,
    )

    def attend(out, q, *rest):
        torch.ops.medusa_vllm.tree_attention(out, q * 1.0, *rest, problem.scale, 0.0, 0)
        return out + 0

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    got = compiled(problem.out.clone(), *problem.args()[1:])
    expected = problem.out.clone()
    kernels.tree_attention_ref(expected, *problem.args()[1:], problem.scale)
    atol, rtol = TOLERANCES[(device, problem.q.dtype)]
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
