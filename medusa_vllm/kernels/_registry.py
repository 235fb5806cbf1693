"""Makes torch.ops.medusa_vllm.{tree_attention, move_accepted_kv, keyed_uniforms, target_probs,
rejection_walk} exist, one way or another.

1. `import medusa_vllm._C` (the compiled extension; its TORCH_LIBRARY block registers the ops
   with CPU and, if built so, CUDA kernels).
2. Otherwise the same schemas are defined here with the PyTorch references as the
   implementation (CompositeExplicitAutograd: any device), so callers see one API.

Either way fake (meta) kernels are registered so torch.compile and CUDA-graph capture can
trace the ops. Set MEDUSA_VLLM_NO_EXT=1 to force path 2 (tests of the fallback use it).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch

from medusa_vllm.kernels import reference

NAMESPACE = "medusa_vllm"
SCHEMAS = {
    "tree_attention": (
        "tree_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, "
        "Tensor block_table, Tensor seq_lens, Tensor query_start_loc, Tensor tree_masks, "
        "Tensor req_tree_ids, float scale, float softcap, int num_splits) -> ()"
    ),
    "move_accepted_kv": (
        "move_accepted_kv(Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor slot_mapping, "
        "Tensor query_start_loc, Tensor accepted) -> ()"
    ),
    "keyed_uniforms": "keyed_uniforms(Tensor keys, int n) -> Tensor",
    "target_probs": (
        "target_probs(Tensor logits, Tensor temperature, Tensor? top_k, Tensor? top_p, "
        "Tensor? min_p) -> Tensor"
    ),
    "rejection_walk": (
        "rejection_walk(Tensor logits, Tensor row_of_node, Tensor children, Tensor drafts, Tensor valid, "
        "Tensor temperature, Tensor? top_k, Tensor? top_p, Tensor? min_p, Tensor accept_u, Tensor final_u) "
        "-> (Tensor, Tensor, Tensor)"
    ),
}
BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` or "
    "`python setup.py build_ext --inplace` from the repository root"
)


@dataclass(frozen=True)
class Registration:
    have_extension: bool
    error: str | None  # why the extension is not used (None when it is)
    fallback_library: torch.library.Library | None  # keeps the Python-defined ops alive


def _import_extension() -> str | None:
    if os.environ.get("MEDUSA_VLLM_NO_EXT", "0") == "1":
        return "disabled by MEDUSA_VLLM_NO_EXT=1"
    try:
        importlib.import_module("medusa_vllm._C")
    except Exception as exc:  # ImportError, or OSError from the dynamic loader
        return f"{type(exc).__name__}: {exc}"
    return None


def _define_fallback() -> torch.library.Library:
    lib = torch.library.Library(NAMESPACE, "DEF")
    for schema in SCHEMAS.values():
        lib.define(schema)
    lib.impl("tree_attention", reference.tree_attention_ref, "CompositeExplicitAutograd")
    lib.impl("move_accepted_kv", reference.move_accepted_kv_ref, "CompositeExplicitAutograd")
    lib.impl("keyed_uniforms", reference.keyed_uniforms_ref, "CompositeExplicitAutograd")
    lib.impl("target_probs", reference.target_probs_ref, "CompositeExplicitAutograd")
    lib.impl("rejection_walk", reference.rejection_walk_ref, "CompositeExplicitAutograd")
    return lib


def _op_exists(name: str) -> bool:
    return hasattr(getattr(torch.ops, NAMESPACE), name)


def _register_fakes() -> None:
    # tree_attention and move_accepted_kv only mutate their inputs and return nothing.
    @torch.library.register_fake(f"{NAMESPACE}::tree_attention")
    def _tree_attention_fake(out, q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                             tree_masks, req_tree_ids, scale, softcap, num_splits) -> None:
        return None

    @torch.library.register_fake(f"{NAMESPACE}::move_accepted_kv")
    def _move_accepted_kv_fake(k_caches, v_caches, slot_mapping, query_start_loc, accepted) -> None:
        return None

    if _op_exists("keyed_uniforms"):  # (an extension built before the op has no keyed_uniforms)
        @torch.library.register_fake(f"{NAMESPACE}::keyed_uniforms")
        def _keyed_uniforms_fake(keys, n):
            return keys.new_empty((keys.shape[0], n), dtype=torch.float32)

    if _op_exists("target_probs"):
        @torch.library.register_fake(f"{NAMESPACE}::target_probs")
        def _target_probs_fake(logits, temperature, top_k, top_p, min_p):
            return logits.new_empty(logits.shape, dtype=torch.float32)

    if _op_exists("rejection_walk"):
        @torch.library.register_fake(f"{NAMESPACE}::rejection_walk")
        def _rejection_walk_fake(logits, row_of_node, children, drafts, valid, temperature, top_k, top_p, min_p,
                                 accept_u, final_u):
            b, levels = row_of_node.shape[0], accept_u.shape[1]
            return (row_of_node.new_empty((b, levels - 1)), row_of_node.new_empty((b,)),
                    row_of_node.new_empty((b,)))


def register() -> Registration:
    """Loads or defines the ops; called once, by medusa_vllm.kernels at import."""
    error = _import_extension()
    library = None
    if error is not None and not _op_exists("tree_attention"):
        library = _define_fallback()
    _register_fakes()
    return Registration(have_extension=error is None, error=error, fallback_library=library)
