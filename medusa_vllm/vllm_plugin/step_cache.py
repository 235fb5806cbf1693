"""Host work of a tree step kept off the critical path: one pinned copy for the step's plan, and
the device tensors of a *uniform* step (every request verifies the full largest tree) made once
per batch size.

Measured on the H100 (``step_timeline_h100.json``): the host, not the GPU, sets a tree step's
cost, and every ``torch.from_numpy(x).to(device, non_blocking=True)`` from pageable memory is a
``cudaMemcpyAsync`` that first waits for the stream (so under asynchronous scheduling it waits for
the previous step's forward) and costs ~20 us of host time; vLLM's spec-decode metadata adds five
freshly pinned tensors a step. In a uniform step all of those are the same for the same batch
size: they come from a cache, and the step issues no host-to-device copy of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class PinnedUpload:
    """Several small integer host arrays to the device in one copy from pinned memory.

    The pinned buffer is rewritten every step: call it inside vLLM's ``synchronize_input_prep``
    (``_prepare_inputs`` is), which waits for the previous step's input copies before the host
    writes reused buffers. The device views are valid until the next call (stream order)."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.host = torch.zeros(capacity, dtype=torch.int64, pin_memory=pin)
        self.host_np = self.host.numpy()
        self.dev = torch.zeros(capacity, dtype=torch.int64, device=device)

    def __call__(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        sizes = [len(a) for a in arrays]
        n = sum(sizes)
        if n > len(self.host_np):
            raise ValueError(f"PinnedUpload: {n} values do not fit its {len(self.host_np)}")
        at = 0
        for a, s in zip(arrays, sizes):
            self.host_np[at : at + s] = a
            at += s
        self.dev[:n].copy_(self.host[:n], non_blocking=True)
        return list(torch.split(self.dev[:n], sizes))


@dataclass
class UniformStep:
    """Device tensors of a uniform step of ``b`` requests (read-only; shared across steps)."""

    position_delta: torch.Tensor  # [b * q] int64: depth - slot per token
    position_delta_np: np.ndarray  # the same on the host (graph check)
    mask_ids: torch.Tensor  # [max_num_reqs] int32: tree + 1 for the b requests, 0 beyond
    spec_ok: torch.Tensor  # [b] bool, all true
    spec_ok_np: np.ndarray  # the same on the host
    num_drafts: torch.Tensor  # [b] int64, all q - 1
    tree_ids: torch.Tensor  # [b] int64, the largest tree
    spec_meta: object | None = None  # vLLM's SpecDecodeMetadata of b requests (without drafts)


class UniformStepCache:
    """Per batch size, the :class:`UniformStep` of the largest tree ``tree_id``."""

    def __init__(self, tree_id: int, offsets: np.ndarray, max_num_reqs: int,
                 device: torch.device) -> None:
        self.tree_id = tree_id
        self.offsets = offsets  # [q] int64: depth(i) - i of the largest tree (0 at the root)
        self.q = len(offsets)
        self.max_num_reqs = max_num_reqs
        self.device = device
        self._steps: dict[int, UniformStep] = {}

    def get(self, b: int) -> UniformStep:
        step = self._steps.get(b)
        if step is None:
            step = self._steps[b] = self._make(b)
        return step

    def _make(self, b: int) -> UniformStep:
        delta = np.tile(self.offsets, b)
        mask_ids = np.zeros(self.max_num_reqs, dtype=np.int32)
        mask_ids[:b] = self.tree_id + 1
        dev = dict(device=self.device)
        return UniformStep(
            position_delta=torch.from_numpy(delta).to(**dev),
            position_delta_np=delta,
            mask_ids=torch.from_numpy(mask_ids).to(**dev),
            spec_ok=torch.ones(b, dtype=torch.bool, **dev),
            spec_ok_np=np.ones(b, dtype=bool),
            num_drafts=torch.full((b,), self.q - 1, dtype=torch.int64, **dev),
            tree_ids=torch.full((b,), self.tree_id, dtype=torch.int64, **dev),
        )


def uniform_drafts(input_ids: torch.Tensor, b: int, q: int) -> torch.Tensor:
    """The draft token ids of a uniform step as vLLM's spec-decode metadata holds them:
    ``input_ids`` [>= b*q] laid out ``[root, q - 1 drafts]`` per request -> [b * (q - 1)]."""
    return input_ids[: b * q].view(b, q)[:, 1:].reshape(-1)


def copy_uniform_input_ids(input_ids: torch.Tensor, prev_sampled: torch.Tensor,
                           prev_drafts: torch.Tensor, prev_width: int, b: int, q: int) -> None:
    """Asynchronous scheduling, a uniform step: every one of the ``b`` requests decoded in the
    step before, at the same batch row, and now runs its root and ``q - 1`` drafts. Writes what
    vLLM's ``_prepare_input_ids`` scatters there with per-token index lists built on the host
    and uploaded each step, as two slice copies: ``input_ids`` [>= b*q] int32 <- per request the
    token it emitted last (``prev_sampled`` [>= b, 1], its next root) and the first ``q - 1`` of
    the drafts proposed for it (``prev_drafts``: rows of ``prev_width`` in batch order, read
    flat as vLLM reads them)."""
    rows = input_ids[: b * q].view(b, q)
    rows[:, 0].copy_(prev_sampled[:b, 0], non_blocking=True)
    rows[:, 1:].copy_(prev_drafts.reshape(-1)[: b * prev_width].view(b, prev_width)[:, : q - 1],
                      non_blocking=True)
