"""torch.ops.medusa_vllm.move_accepted_kv against the loop reference: the overlap hazard,
-1 padding, no-op steps, several layers, both cache layouts, CPU and CUDA."""

from __future__ import annotations

import pytest
import torch

from medusa_vllm import kernels
from medusa_vllm.kernels import testing as kt

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def skip_strided_on_cuda(device, layout):
    if device == "cuda" and layout not in kt.UNIT_STRIDE_LAYOUTS:
        pytest.skip("the CUDA kernel takes unit-stride head_dim views")


def make_layers(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [kt.make_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device, layout, gen)
            for _ in range(num_layers)]


def make_batch(q_lens, ctx_lens, block_size, num_blocks, seed=0):
    """Slot mapping of each request's window (contiguous positions after its context)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    table = kt.make_block_table(seq_lens, block_size, num_blocks, gen)
    slots, qsl = [], [0]
    for b, (c, q) in enumerate(zip(ctx_lens, q_lens)):
        slots += kt.slots_of(table, b, range(c, c + q), block_size)
        qsl.append(qsl[-1] + q)
    return torch.tensor(slots, dtype=torch.int64), torch.tensor(qsl, dtype=torch.int32)


def accepted_tensor(rows, width):
    out = torch.full((len(rows), width), -1, dtype=torch.int32)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row, dtype=torch.int32)
    return out


def run_and_compare(layers, slots, qsl, accepted, device):
    storages = [c.storage for c in layers]
    before = [s.clone() for s in storages]
    kernels.move_accepted_kv([c.k for c in layers], [c.v for c in layers], slots.to(device), qsl.to(device),
                             accepted.to(device))
    got = [s.clone() for s in storages]
    for s, b in zip(storages, before):
        s.copy_(b)
    kernels.move_accepted_kv_ref([c.k for c in layers], [c.v for c in layers], slots.to(device), qsl.to(device),
                                 accepted.to(device))
    for g, s in zip(got, storages):
        assert torch.equal(g, s)
    return before


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", kt.LAYOUTS)
def test_hazard_chain_of_moves(device, layout):
    """accepted = [2, 5]: step 0 copies 2 -> 1, step 1 copies 5 -> 2 (2 was a source first)."""
    skip_strided_on_cuda(device, layout)
    block_size, q_len = 16, 8
    layers = make_layers(3, 4, block_size, 2, 64, torch.bfloat16, device, layout)
    slots, qsl = make_batch([q_len], [13], block_size, 4)
    before = run_and_compare(layers, slots, qsl, accepted_tensor([[2, 5]], 6), device)
    # Spelled out for layer 0, K and V: window 1 <- old 2, window 2 <- old 5, the rest unchanged.
    layer = layers[0]
    old = kt.make_kv_cache(4, block_size, 2, 64, torch.bfloat16, device, layout)
    old.storage.copy_(before[0])
    pos = lambda w: (int(slots[w]) // block_size, int(slots[w]) % block_size)  # noqa: E731
    for view, old_view in ((layer.k, old.k), (layer.v, old.v)):
        assert torch.equal(view[pos(1)], old_view[pos(2)])
        assert torch.equal(view[pos(2)], old_view[pos(5)])
        for w in (0, 3, 4, 5, 6, 7):
            assert torch.equal(view[pos(w)], old_view[pos(w)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", kt.LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_with_noops_padding_and_empty_requests(device, layout, dtype):
    skip_strided_on_cuda(device, layout)
    block_size = 32
    q_lens = [17, 0, 1, 64, 9, 5]
    rows = [
        [1, 2, 7, 9],  # steps 0, 1 are no-ops
        [],  # padded request (q_len 0)
        [],  # decode: nothing accepted
        [3, 4, 10, 33, 60, 63],  # crosses block boundaries
        [8],
        [-1, 2],  # ends at once (-1 first)
    ]
    num_blocks = 12
    layers = make_layers(4, num_blocks, block_size, 3, 64, dtype, device, layout, seed=1)
    slots, qsl = make_batch(q_lens, [5, 0, 40, 31, 64, 2], block_size, num_blocks, seed=1)
    run_and_compare(layers, slots, qsl, accepted_tensor(rows, 8), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [64, 128, 6])  # 6 x bf16 = 12 bytes: a narrower copy unit on CUDA
def test_random_paths(device, head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    block_size, num_blocks = 16, 64
    q_lens = [int(torch.randint(1, 65, (1,), generator=gen)) for _ in range(8)]
    rows = []
    for q in q_lens:
        depth = int(torch.randint(0, min(q, 6), (1,), generator=gen))
        rows.append(sorted(torch.randperm(q - 1, generator=gen)[:depth].add(1).tolist()))
    layers = make_layers(2, num_blocks, block_size, 2, head_dim, torch.bfloat16, device, "nhd", seed=2)
    slots, qsl = make_batch(q_lens, [int(torch.randint(0, 50, (1,), generator=gen)) for _ in q_lens],
                            block_size, num_blocks, seed=2)
    run_and_compare(layers, slots, qsl, accepted_tensor(rows, 7), device)


@pytest.mark.parametrize("device", DEVICES)
def test_padding_slot_is_skipped(device):
    layers = make_layers(1, 4, 16, 1, 64, torch.float32 if device == "cpu" else torch.bfloat16, device, "nhd")
    slots, qsl = make_batch([6], [3], 16, 4)
    slots[4] = -1  # window index 4 has no slot: step 1 (4 -> 2) is skipped
    run_and_compare(layers, slots, qsl, accepted_tensor([[3, 4, 5]], 3), device)


def test_cpu_rejects_invalid_accepted_lists():
    layers = make_layers(1, 4, 16, 1, 64, torch.float32, "cpu", "nhd")
    slots, qsl = make_batch([6], [3], 16, 4)
    args = ([layers[0].k], [layers[0].v], slots, qsl)
    with pytest.raises(RuntimeError, match="strictly increasing"):
        kernels.move_accepted_kv(*args, accepted_tensor([[3, 2]], 2))
    with pytest.raises(RuntimeError, match="window index"):
        kernels.move_accepted_kv(*args, accepted_tensor([[6]], 2))  # q_len is 6
