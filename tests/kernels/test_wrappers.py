"""The Python layer: the fallback without the extension, precondition errors, mask packing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from medusa_vllm import kernels
from medusa_vllm.kernels import testing as kt

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FALLBACK_SCRIPT = textwrap.dedent(
    """
    import warnings
    import torch
    from medusa_vllm import kernels
    from medusa_vllm.kernels import testing as kt

    assert not kernels.have_extension()
    assert "pip install --no-build-isolation -e ." in kernels.extension_error()
    p = kt.make_tree_attention_problem(
        q_lens=[17, 1], ctx_lens=[40, 9], tree_ids=[0, 0], masks=[kt.medusa_mask(16)], num_q_heads=4,
        num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32, device="cpu")
    expected = p.out.clone()
    kernels.tree_attention_ref(expected, *p.args()[1:], p.scale)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            kernels.tree_attention(p.out, *p.args()[1:], p.scale)
        assert torch.equal(p.out, expected)
        acc = torch.tensor([[2, 5, -1]], dtype=torch.int32)
        kernels.move_accepted_kv([p.cache.k], [p.cache.v], p.slot_mapping[:17], p.query_start_loc[:2], acc)
    fallback = [w for w in caught if "Falling back" in str(w.message)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    # the Python-defined ops trace like the compiled ones (fake kernels registered)
    def attend(o, *a):
        torch.ops.medusa_vllm.tree_attention(o, *a, p.scale, 0.0, 0)
        return o + 0
    got = torch.compile(attend, backend="aot_eager", fullgraph=True)(p.out.clone(), *p.args()[1:])
    expected = p.out.clone()  # the move changed the cache
    kernels.tree_attention_ref(expected, *p.args()[1:], p.scale)
    assert torch.equal(got, expected)
    keys = torch.tensor([[5, 3], [-2, 2**33]])
    assert torch.equal(torch.ops.medusa_vllm.keyed_uniforms(keys, 7), kernels.keyed_uniforms_ref(keys, 7))
    assert torch.equal(kernels.keyed_uniforms(keys, 7), kernels.keyed_uniforms_ref(keys, 7))
    x, t = torch.randn(3, 40), torch.tensor([1.0, 0.5, 2.0])
    k, p = torch.tensor([40, 3, 10], dtype=torch.int32), torch.tensor([0.9, 1.0, 0.5])
    assert torch.equal(kernels.target_probs(x, t, k, p), kernels.target_probs_ref(x, t, k, p))
    assert torch.equal(torch.ops.medusa_vllm.target_probs(x, t, k, p, None), kernels.target_probs_ref(x, t, k, p))
    walk = kt.walk_problem(5, 60, seed=0, filters=True)
    for got, want in zip(torch.ops.medusa_vllm.rejection_walk(*walk), kernels.rejection_walk_ref(*walk)):
        assert torch.equal(got, want)
    print("FALLBACK_OK")
    """
)


def test_fallback_without_extension_matches_reference_and_warns_once():
    env = dict(os.environ, MEDUSA_VLLM_NO_EXT="1", PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "FALLBACK_OK" in result.stdout, result.stderr[-3000:]


def test_extension_is_loaded_here():
    """The rest of this suite tests the compiled kernels, not the fallback."""
    if os.environ.get("MEDUSA_VLLM_NO_EXT") == "1":
        pytest.skip("extension disabled on purpose")
    assert kernels.have_extension(), kernels.extension_error()


def small_problem(**overrides):
    kwargs = dict(q_lens=[5, 3], ctx_lens=[20, 7], tree_ids=[0, 0], masks=[kt.chain_mask(5)], num_q_heads=4,
                  num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32, device="cpu")
    kwargs.update(overrides)
    return kt.make_tree_attention_problem(**kwargs)


def call(p, **replace):
    args = dict(out=p.out, q=p.q, k_cache=p.cache.k, v_cache=p.cache.v, block_table=p.block_table,
                seq_lens=p.seq_lens, query_start_loc=p.query_start_loc, tree_masks=p.tree_masks,
                req_tree_ids=p.req_tree_ids, scale=p.scale)
    args.update(replace)
    return kernels.tree_attention(**args)


@pytest.mark.parametrize(
    "replace,match",
    [
        (lambda p: dict(q=p.q.double(), out=p.out.double()), "q must be one of"),
        (lambda p: dict(q=p.q[0]), "q must be 3-D"),
        (lambda p: dict(k_cache=p.cache.k[0]), "k_cache must be a 4-D view"),
        (lambda p: dict(k_cache=p.cache.k.bfloat16()), "share one dtype"),
        (lambda p: dict(block_table=p.block_table.long()), "block_table must be torch.int32"),
        (lambda p: dict(tree_masks=p.tree_masks[..., :0]), r"ceil\(Q_MAX / 64\)"),
        (lambda p: dict(q=p.q.transpose(1, 2), out=p.out.transpose(1, 2)), "contiguous in head_dim"),
        (lambda p: dict(query_start_loc=p.query_start_loc[:2]), "num_requests \\+ 1"),
    ],
)
def test_bad_inputs_raise_clear_errors(replace, match):
    p = small_problem()
    with pytest.raises(ValueError, match=match):
        call(p, **replace(p))


def test_cpu_kernel_checks_values():
    """q_len > Q_MAX and friends: the C++ CPU op reads the metadata and says what is wrong."""
    p = small_problem(q_lens=[5, 3], masks=[kt.chain_mask(4)], q_max=4)
    with pytest.raises(RuntimeError, match=r"q_len 5 > Q_MAX = 4"):
        call(p)
    with pytest.raises(ValueError, match=r"q_len 5 > Q_MAX = 4"):
        kernels.tree_attention(p.out, *p.args()[1:], p.scale, validate=True)
    p = small_problem()
    p.req_tree_ids[1] = 3
    with pytest.raises(RuntimeError, match=r"req_tree_ids\[1\] = 3"):
        call(p)
    p = small_problem()
    p.block_table[0, 0] = 10_000
    with pytest.raises(RuntimeError, match="is not a block id"):
        call(p)


def test_unchecked_fast_path_matches_and_the_op_still_checks_dtypes():
    """check=False (the vLLM plugin's per-layer path after its first call) skips only the Python
    metadata checks: same output, and the C++ op still refuses wrong index dtypes."""
    p = small_problem()
    want = call(p).clone()
    p.out.zero_()
    torch.testing.assert_close(call(p, check=False), want, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="must have dtype Int"):
        call(p, block_table=p.block_table.long(), check=False)


def test_op_level_checks_without_the_wrapper():
    p = small_problem()
    with pytest.raises(RuntimeError, match="must have dtype Int"):
        torch.ops.medusa_vllm.tree_attention(p.out, p.q, p.cache.k, p.cache.v, p.block_table, p.seq_lens.long(),
                                             p.query_start_loc, p.tree_masks, p.req_tree_ids, 1.0, 0.0, 0)


@pytest.mark.parametrize("q", [1, 5, 63, 64, 65, 128])
def test_pack_unpack_roundtrip(q):
    gen = torch.Generator().manual_seed(q)
    masks = torch.rand(3, q, q, generator=gen) < 0.5
    masks[:, :, q - 1] = True  # the top bit of a word (bit 63 when q == 64) is set
    packed = kernels.pack_tree_masks(masks)
    assert packed.dtype == torch.int64 and packed.shape == (3, q, (q + 63) // 64)
    assert torch.equal(kernels.unpack_tree_masks(packed), masks)


def test_pack_bit_positions():
    mask = torch.zeros(1, 66, 66, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 0, 63] = mask[0, 0, 65] = True
    packed = kernels.pack_tree_masks(mask)
    assert packed[0, 0, 0].item() == (1 | (1 << 63)) - (1 << 64)  # two's complement of bit 63
    assert packed[0, 0, 1].item() == 1 << 1


def test_medusa_mask_is_the_ancestor_mask():
    mask = kt.medusa_mask(63)
    assert mask.shape == (64, 64)
    assert mask[:, 0].all() and mask.diagonal().all()
    depth = mask.sum(1) - 1  # ancestors excluding self
    assert depth.max() == 4 and (depth == 1).sum() == 10  # mc_sim_7b_63: 10 root children, depth 4
    # node 63 = [0, 0, 0, 1] (last in (len, path) order) sees root, [0], [0,0], [0,0,0] and itself
    parents = kt.parents_from_paths(kt.MC_SIM_7B_63)
    chain, node = [], 63
    while node >= 0:
        chain.append(node)
        node = parents[node]
    assert set(mask[63].nonzero().flatten().tolist()) == set(chain)
