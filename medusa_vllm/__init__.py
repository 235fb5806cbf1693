"""medusa_vllm: Medusa tree speculative decoding for vLLM 0.26.

Importing the package is cheap (no torch, no vLLM): vLLM imports it through the
`vllm.general_plugins` entry point. Public names load their module on first use.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it (loaded lazily by __getattr__)
_EXPORTS: dict[str, str] = {
    "MedusaHeadsConfig": "medusa_vllm.heads",
    "MedusaHeads": "medusa_vllm.heads",
    "ResBlock": "medusa_vllm.heads",
    "CheckpointError": "medusa_vllm.checkpoint",
    "save_heads": "medusa_vllm.checkpoint",
    "load_heads": "medusa_vllm.checkpoint",
    "convert_heads": "medusa_vllm.checkpoint",
    "load_lm_head_weight": "medusa_vllm.checkpoint",
    "BUNDLED_MODEL_NAME": "medusa_vllm.bundled",
    "bundled_model_path": "medusa_vllm.bundled",
    "bundled_heads_path": "medusa_vllm.bundled",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from medusa_vllm.bundled import BUNDLED_MODEL_NAME, bundled_heads_path, bundled_model_path
    from medusa_vllm.checkpoint import (
        CheckpointError,
        convert_heads,
        load_heads,
        load_lm_head_weight,
        save_heads,
    )
    from medusa_vllm.heads import MedusaHeads, MedusaHeadsConfig, ResBlock


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medusa_vllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
