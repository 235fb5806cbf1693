"""How the attention builders split a step between the tree kernel and vLLM's backend
(medusa_vllm.vllm_plugin.attention._split_build), with the builder and vLLM's metadata stubbed:
only the split decision and the buffers handed to the kernel are under test."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from medusa_vllm.vllm_plugin.attention import MedusaAttnContext, MedusaMetadata, TreeAttnStep, _split_build

Q = 6


def _ctx(step):
    ctx = MedusaAttnContext(torch.zeros(2, Q, 1, dtype=torch.int64), max_num_reqs=4)
    ctx.step = step
    return ctx


def _cm(num_reqs=2):
    n = num_reqs * Q
    return SimpleNamespace(
        num_reqs=num_reqs, num_actual_tokens=n,
        query_start_loc=torch.arange(0, n + 1, Q, dtype=torch.int32),
        seq_lens=torch.full((num_reqs,), 40, dtype=torch.int32),
        block_table_tensor=torch.zeros(num_reqs, 8, dtype=torch.int32),
        slot_mapping=torch.arange(n),
    )


def _vllm_build(*args):
    return "vllm"


def test_graph_capture_step_builds_tree_metadata_over_persistent_buffers():
    # vLLM captures its FULL graphs from uniform dummy runs; the runner marks them with
    # TreeAttnStep.for_capture() (no real requests, all_reqs). The captured attention must be
    # the tree kernel reading the persistent mask-id buffer, not vLLM's causal attention.
    ctx = _ctx(TreeAttnStep.for_capture())
    cm = _cm()
    md = _split_build(SimpleNamespace(medusa=ctx), _vllm_build, 0, cm, False)
    assert isinstance(md, MedusaMetadata), "the FULL graph would hold vLLM's causal attention"
    assert md.rest is None and md.tree.num_tokens == 2 * Q
    assert md.tree.mask_ids.data_ptr() == ctx.mask_ids.data_ptr()  # the buffer the runner fills
    assert md.tree.seq_lens.data_ptr() == cm.seq_lens.data_ptr()
    assert md.tree.query_start_loc.data_ptr() == cm.query_start_loc.data_ptr()
    assert md.tree.block_table.data_ptr() == cm.block_table_tensor.data_ptr()


@pytest.mark.parametrize("step", [None, TreeAttnStep(0, 0)])
def test_steps_without_tree_decodes_stay_with_vllm(step):
    assert _split_build(SimpleNamespace(medusa=_ctx(step)), _vllm_build, 0, _cm(), False) == "vllm"
    assert _split_build(SimpleNamespace(), _vllm_build, 0, _cm(), False) == "vllm"  # no context


def test_uniform_tree_step_goes_whole_to_the_kernel():
    md = _split_build(SimpleNamespace(medusa=_ctx(TreeAttnStep(2, 2 * Q, all_reqs=True))),
                      _vllm_build, 0, _cm(), False)
    assert isinstance(md, MedusaMetadata) and md.rest is None and md.num_actual_tokens == 2 * Q


def test_the_slice_for_vllms_backend_starts_aligned():
    """A step that mixes tree decodes with other requests hands vLLM's backend its slice of the
    metadata; vLLM slices views (``seq_lens[nd:]`` starts 4*nd bytes in), and Triton would
    compile a kernel variant for an unaligned pointer: the slice gets 16-byte aligned copies,
    same values."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    lens = [1 + Q, 1 + Q, 1 + Q, 40, 50]  # 3 tree decodes, 2 prefills
    q = [Q, Q, Q, 20, 30]
    qsl = torch.tensor([0, *torch.tensor(q).cumsum(0).tolist()], dtype=torch.int32)
    n = int(qsl[-1])
    cm = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(),
        seq_lens=torch.tensor(lens, dtype=torch.int32), num_reqs=5, num_actual_tokens=n,
        max_query_len=max(q), max_seq_len=max(lens),
        block_table_tensor=torch.arange(5 * 8, dtype=torch.int32).view(5, 8),
        slot_mapping=torch.arange(n, dtype=torch.int64),
        seq_lens_cpu_upper_bound=torch.tensor(lens, dtype=torch.int32),
    )
    seen = {}

    def parent(prefix, sliced, fast):
        seen["cm"] = sliced
        return "vllm"

    assert cm.seq_lens[3:].data_ptr() % 16 != 0  # what vLLM's slice alone would hand over
    md = _split_build(SimpleNamespace(medusa=_ctx(TreeAttnStep(3, 3 * Q))), parent, 0, cm, False)
    assert isinstance(md, MedusaMetadata) and md.rest == "vllm" and md.tree.num_tokens == 3 * Q
    rest = seen["cm"]
    assert rest.num_reqs == 2 and rest.seq_lens.tolist() == [40, 50]
    assert rest.query_start_loc.tolist() == [0, 20, 50]
    assert torch.equal(rest.block_table_tensor, cm.block_table_tensor[3:])
    assert torch.equal(rest.slot_mapping, cm.slot_mapping[3 * Q:])
    for name, v in vars(rest).items():
        if isinstance(v, torch.Tensor):
            assert v.data_ptr() % 16 == 0, name


def test_a_capture_marked_as_a_whole_takes_tree_shapes_only():
    """vLLM's V2 runner: one mark covers all of its capture, so only uniform batches of 2..Q
    tokens per request are tree steps; plain decoding's graphs (one token) and mixed batches
    keep vLLM's attention."""
    from medusa_vllm.vllm_plugin.attention import tree_capture_shape

    def cm(reqs, tokens, max_q):
        return SimpleNamespace(num_reqs=reqs, num_actual_tokens=tokens, max_query_len=max_q)

    assert tree_capture_shape(cm(4, 64, 16), 16) and tree_capture_shape(cm(2, 8, 4), 16)
    assert not tree_capture_shape(cm(8, 8, 1), 16)  # plain decoding
    assert not tree_capture_shape(cm(3, 40, 16), 16)  # not uniform
    assert not tree_capture_shape(cm(1, 32, 32), 16)  # longer than the tree kernel's query
    assert TreeAttnStep.for_capture(uniform_only=True).uniform_only and not TreeAttnStep.for_capture().uniform_only


def test_a_v2_capture_of_plain_decoding_builds_vllms_metadata():
    """The load-adaptive tree on V2 also captures plain decoding (one token per request) under
    the whole-capture mark: its build, and Triton's capture override that sets the result's
    seq_lens, must get vLLM's own metadata, not the tree kernel's (the H100 run at 0b14a3e
    failed at start-up with "'MedusaMetadata' object has no attribute 'seq_lens'")."""
    ctx = _ctx(TreeAttnStep.for_capture(uniform_only=True))
    plain = SimpleNamespace(**{**vars(_cm(4)), "max_query_len": 1, "num_actual_tokens": 4})
    assert _split_build(SimpleNamespace(medusa=ctx), _vllm_build, 0, plain, False) == "vllm"
    tree = SimpleNamespace(**{**vars(_cm(2)), "max_query_len": Q})
    assert isinstance(_split_build(SimpleNamespace(medusa=ctx), _vllm_build, 0, tree, False), MedusaMetadata)


# ----------------------------------------------------------------------------- GPU parent backends
@pytest.mark.parametrize("parent", ["triton", "flash"])
def test_tree_backends_wrap_vllms_gpu_backends(parent):
    """The CUSTOM backend over TRITON_ATTN or FLASH_ATTN (MEDUSA_VLLM_PARENT_ATTENTION): vLLM's
    classes underneath, our split on top, FULL graphs for uniform batches only, and classes
    found by the path the plugin registers (vLLM resolves it by name in every process)."""
    import importlib
    import pickle

    from vllm.v1.attention.backend import AttentionCGSupport

    from medusa_vllm.vllm_plugin import parent_attention_path
    from medusa_vllm.vllm_plugin.attention import TreeImplMixin

    path = parent_attention_path(parent)
    module, name = path.rsplit(".", 1)
    backend = getattr(importlib.import_module(module), name)
    vllm_name = {"triton": "TRITON_ATTN", "flash": "FLASH_ATTN"}[parent]
    assert backend.get_name() == "CUSTOM" and backend.__mro__[1].get_name() == vllm_name
    impl, builder = backend.get_impl_cls(), backend.get_builder_cls()
    assert issubclass(impl, TreeImplMixin) and impl.__mro__[2].__module__.startswith("vllm.")
    assert builder.get_cudagraph_support(None, None) == AttentionCGSupport.UNIFORM_BATCH
    for cls in (backend, impl, builder):
        assert pickle.loads(pickle.dumps(cls)) is cls and cls.__qualname__.startswith("Medusa")


def test_tree_kernel_views_are_the_caches_vllms_backends_write():
    """The tree kernel's K and V views of a layer's cache are the ones vLLM's FLASH_ATTN and
    TRITON_ATTN write (both split the packed [nb, H, bs, 2D] cache the same way in 0.26)."""
    from medusa_vllm.vllm_plugin.attention_gpu import packed_kv_views

    nb, h, bs, d = 3, 2, 16, 8
    cache = torch.randn(nb, bs, h, 2 * d).transpose(1, 2)  # physical [nb, bs, H, 2D]
    k, v = packed_kv_views(cache)
    k_vllm, v_vllm = cache.transpose(1, 2).split(d, dim=-1)  # FlashAttentionImpl.do_kv_cache_update
    assert k.shape == (nb, bs, h, d) and torch.equal(k, k_vllm) and torch.equal(v, v_vllm)
    assert k.data_ptr() == cache.data_ptr() and v.data_ptr() == cache.data_ptr() + d * cache.element_size()


def test_parent_attention_choice_is_checked(monkeypatch):
    from medusa_vllm.vllm_plugin import parent_attention_path

    monkeypatch.delenv("MEDUSA_VLLM_PARENT_ATTENTION", raising=False)
    assert parent_attention_path().endswith("attention_triton.MedusaTritonBackend")
    monkeypatch.setenv("MEDUSA_VLLM_PARENT_ATTENTION", "flash")
    assert parent_attention_path().endswith("attention_flash.MedusaFlashBackend")
    monkeypatch.setenv("MEDUSA_VLLM_PARENT_ATTENTION", "flashinfer")
    with pytest.raises(ValueError, match="MEDUSA_VLLM_PARENT_ATTENTION='flashinfer': give one of"):
        parent_attention_path()
