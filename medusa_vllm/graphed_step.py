"""The tree step after the forward pass as one fixed-shape function, and CUDA graphs of it.

In a *uniform* step every request verifies its full tree: Q = 1 + nodes logits rows per
request, in request order, so each row's place is known without any index bookkeeping. Then
verification, the hidden state of the last accepted node and the next drafts (the heads, top-k,
tree gather) are a pure function of tensors whose shapes depend only on the batch size B:
:func:`greedy_tree_step` (greedy rule, from the target argmax of each row) and
:func:`sampled_tree_step` (any mix of greedy and sampled requests, from the logits, with the
step's random numbers, or the keys they are hashed from, as inputs: a replay is deterministic
and seeded requests keep their own streams). :class:`BatchGraphs` captures such a function
once per B in a CUDA graph (static input buffers, one shared memory pool) and replays it: tens
to hundreds of kernel launches from Python become one graph launch plus the input copies.

Nothing here knows vLLM; the runner decides when a step is uniform, and whether it is greedy.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from medusa_vllm.sampling import SamplingBatch, StepRandomness, keyed_uniforms
from medusa_vllm.tree_tensors import TreeTensors
from medusa_vllm.verify import TYPICAL_DELTA, TYPICAL_EPS, TreeBatch, greedy_from_argmax, verify

logger = logging.getLogger(__name__)


@dataclass
class TreeStepOutput:
    tokens: torch.Tensor  # [B, D+1] int32 emitted tokens, -1 pad
    accepted: torch.Tensor  # [B, D] int32 accepted window offsets, -1 pad (move_accepted_kv)
    num_accepted: torch.Tensor  # [B] int64
    drafts: torch.Tensor  # [B, T] int64 next drafts, BFS order (-1 row: no drafts)

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return self.tokens, self.accepted, self.num_accepted, self.drafts


def handover(tokens: torch.Tensor, num_accepted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What asynchronous scheduling hands to the next step, per request: the last token it
    emitted (its next root) and how many it emitted, both [B] int32, from ``tokens`` [B, D+1]
    int32 (-1 pad) and ``num_accepted`` [B] int64 (the emitted count is num_accepted + 1)."""
    last = tokens.gather(1, num_accepted.long()[:, None]).squeeze(1)
    return last, (num_accepted + 1).int()


def greedy_tree_step(
    argmax: torch.Tensor,  # [B*Q] int64 target argmax of every row (request-major)
    drafts: torch.Tensor,  # [B*(Q-1)] draft token of every tree node (request-major, BFS)
    hidden: torch.Tensor,  # [B*Q, H] hidden state of every row
    tree_ids: torch.Tensor,  # [B] int64 tree each request's drafts follow
    trees: TreeTensors,
    propose: Callable[[torch.Tensor], torch.Tensor],  # [B, H] -> [B, T] int64 next drafts
) -> TreeStepOutput:
    b = tree_ids.shape[0]
    q = argmax.shape[0] // b  # 1 + nodes of the tree every request verifies
    q_max = trees.parents.shape[1]  # the verifier's slots: 1 + nodes of the largest tree
    num_nodes = torch.full_like(tree_ids, q - 1)
    # a smaller tree's rows padded to the verifier's width (slots past num_nodes are invalid)
    slots = torch.nn.functional.pad(argmax.view(b, q), (0, q_max - q))
    nodes = torch.nn.functional.pad(drafts.view(b, q - 1), (0, q_max - q))
    out = greedy_from_argmax(slots, nodes, TreeBatch.gather(trees, tree_ids, num_nodes))
    rows = torch.arange(b, device=argmax.device) * q + out.last_node  # [B] row of each last accepted node
    return TreeStepOutput(out.tokens.int(), out.accepted.int(), out.num_accepted, propose(hidden[rows]))


def sampling_params_tensor(sampling: SamplingBatch) -> torch.Tensor:
    """[B, 4] float32 columns temperature, top-k, top-p, min-p of a batch's parameters: the
    sampled step's one input instead of four (top-k is exact in float32 below 2**24; min-p 0
    masks nothing)."""
    min_p = sampling.min_p if sampling.min_p is not None else torch.zeros_like(sampling.temperature)
    return torch.stack([sampling.temperature.float(), sampling.top_k.float(), sampling.top_p.float(),
                        min_p.float()], dim=1)


def sampled_tree_step(
    logits: torch.Tensor,  # [B*Q, V] target logits of every row (request-major), penalties applied
    drafts: torch.Tensor,  # [B*(Q-1)] draft token of every tree node (request-major, BFS)
    hidden: torch.Tensor,  # [B*Q, H] hidden state of every row
    tree_ids: torch.Tensor,  # [B] int64 tree each request's drafts follow
    params: torch.Tensor,  # [B, 4] float32 sampling parameters (sampling_params_tensor)
    rand: torch.Tensor,  # [B, L*C+1] float32 StepRandomness.flat(), or [B, 2] int64 keys (keyed_uniforms)
    trees: TreeTensors,
    propose: Callable[[torch.Tensor], torch.Tensor],  # [B, H] -> [B, T] int64 next drafts
    rule: str = "rejection",  # sampled requests' rule (greedy ones: the greedy rule; see verify)
    filtered: bool = True,  # some request uses top-k, top-p or min-p (False: none of them runs)
    eps: float = TYPICAL_EPS,
    delta: float = TYPICAL_DELTA,
) -> TreeStepOutput:
    """The uniform step of a batch with sampled requests: exactly what :func:`verify` gives on
    the same rows with the same random numbers, then the next drafts. ``rand``: the numbers
    themselves, or each request's (seed, counter) key, hashed here (inside a graph: no
    per-request work on the host)."""
    b = tree_ids.shape[0]
    q = logits.shape[0] // b
    q_max = trees.parents.shape[1]
    levels = trees.max_depth + 1
    if rand.dtype == torch.int64:
        rand = keyed_uniforms(rand, StepRandomness.flat_width(levels, trees.children.shape[2]))
    slots = torch.arange(q_max, device=logits.device)
    base = torch.arange(b, device=logits.device)[:, None] * q
    row_of_node = torch.where(slots[None, :] < q, base + slots[None, :], -1)  # [B, Q_max]
    nodes = torch.nn.functional.pad(drafts.view(b, q - 1), (0, q_max - q))
    sampling = SamplingBatch(params[:, 0], params[:, 1].long(), params[:, 2], None, filtered,
                             params[:, 3] if filtered else None)
    out = verify(rule, logits, row_of_node, nodes, torch.full_like(tree_ids, q - 1), tree_ids, trees,
                 sampling, eps=eps, delta=delta, rand=StepRandomness.from_flat(rand, levels))
    rows = base[:, 0] + out.last_node  # [B] row of each last accepted node
    return TreeStepOutput(out.tokens.int(), out.accepted.int(), out.num_accepted, propose(hidden[rows]))


class BatchGraphs:
    """CUDA graphs of ``fn(*inputs) -> tuple of tensors``, one per batch size B, captured up
    front by :meth:`capture` (vLLM's start-up, beside its own graphs: capturing while serving
    would stall steps). Each input's leading dimension is ``rows_per_req[i] * B``; inputs are
    copied into static buffers sized for ``max_batch``; the outputs are the graph's own tensors
    (every output's leading dimension is B), valid until the next call (of any set given the
    same ``pool``: a CUDA graph memory pool handle, set before the first capture). ``fn`` must
    be free of host syncs, each request's outputs and side effects must depend on its own input
    rows only, and a side effect must be idempotent on the capture's example inputs (run three
    times there): a call with a B that has no graph replays the next larger one, whose extra requests
    read what earlier calls left in the buffers (zeros at first: valid inputs), and returns the
    first B rows. ``pad`` (one value or None per input) fills those extra requests' rows
    before such a replay: a side effect of ``fn`` (the accepted-KV move) keyed on them can be
    made a no-op (-1 slots). Sets that never run at once may share an input's static buffer
    (``buffers``, set before the first capture; its contents are zeros or any earlier call's
    valid rows). Past the largest graph (or
    with graphs disabled) ``fn`` runs eagerly, and so does a call whose inputs differ
    in dtype or trailing shape from the captured ones (a copy into the buffers would cast them).

    :meth:`capture` checks each graph against an eager run on the same inputs: a difference in
    the first ``exact`` outputs (or a capture that fails) disables the graphs, loudly, so callers
    get eager results, never wrong ones; later outputs may differ by rounding (logged).
    """

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], rows_per_req: list[int],
                 max_batch: int, exact: int, name: str, pad: list | None = None) -> None:
        self.fn = fn
        self.rows_per_req = rows_per_req
        self.pad = pad or [None] * len(rows_per_req)
        self.max_batch = max_batch
        self.exact = exact
        self.name = name
        self.enabled = True
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
        self._padded: list[int] = []  # [b] -> the captured batch size that serves b (0: none)
        self.static: list[torch.Tensor] | None = None
        # input index -> a static buffer other sets share (set before the first capture)
        self.buffers: dict[int, torch.Tensor] = {}
        self.pool = None
        self.calls = self.replays = 0  # host counters: how many calls took a graph

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.calls += 1
        b = inputs[0].shape[0] // self.rows_per_req[0]
        padded = self._padded[b] if self.enabled and b < len(self._padded) else 0
        if padded and any(x.dtype != s.dtype or x.shape[1:] != s.shape[1:] for x, s in zip(inputs, self.static)):
            padded = 0  # not what the graphs were captured for (e.g. float32 logits after penalties)
        if not padded:
            return self.fn(*inputs)
        self._load(inputs, padded)
        graph, outputs = self.graphs[padded]
        graph.replay()
        self.replays += 1
        return outputs if padded == b else tuple(o[:b] for o in outputs)

    def _load(self, inputs, padded: int | None = None) -> list[torch.Tensor]:
        """Inputs into the static buffers; views of ``padded`` (default: the inputs') requests."""
        b = inputs[0].shape[0] // self.rows_per_req[0]
        if self.static is None:  # zeros: padding requests read valid values from the start
            self.static = [self._buffer(i, r * self.max_batch, x) for i, (r, x) in enumerate(zip(self.rows_per_req, inputs))]
        views = []
        for buf, r, x, fill in zip(self.static, self.rows_per_req, inputs, self.pad):
            buf[: r * b].copy_(x)
            if padded and padded > b and fill is not None:
                buf[r * b: r * padded].fill_(fill)
            views.append(buf[: r * (padded or b)])
        return views

    def _buffer(self, i: int, rows: int, x: torch.Tensor) -> torch.Tensor:
        """Input i's static buffer: the first ``rows`` rows of ``buffers[i]`` (one the caller
        shares between graph sets) if it fits, else a new one."""
        shared = self.buffers.get(i)
        if (shared is not None and shared.shape[0] >= rows and shared.dtype == x.dtype
                and shared.shape[1:] == x.shape[1:] and shared.device == x.device):
            return shared[:rows]
        return torch.zeros((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)

    def summary(self) -> dict:
        return {"graph_batch_sizes": sorted(self.graphs) if self.enabled else [],
                "steps": self.calls, "graph_replays": self.replays}

    def capture(self, *inputs: torch.Tensor) -> bool:
        """Capture the graph of the batch size of ``inputs`` (example values); True if it is
        in use. Host syncs are fine here (start-up)."""
        b = inputs[0].shape[0] // self.rows_per_req[0]
        if not self.enabled or b > self.max_batch or b in self.graphs:
            return b in self.graphs
        with _sync_debug_off():
            views = self._load(inputs)
            reference = [t.clone() for t in self.fn(*views)]
            try:
                side = capture_stream(views[0].device)
                with on_stream(side):  # warm-up off the capture (cuBLAS workspaces, …)
                    self.fn(*views)
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=side):
                    outputs = self.fn(*views)
                graph.replay()
            except Exception as exc:  # noqa: BLE001 - eager from now on, loudly
                self.enabled = False
                logger.warning("medusa_vllm: %s CUDA graph capture failed for batch %d (%s: %s); "
                               "running it eagerly", self.name, b, type(exc).__name__, exc)
                return False
            diffs = [i for i, (o, r) in enumerate(zip(outputs, reference)) if not torch.equal(o, r)]
            if any(i < self.exact for i in diffs):
                self.enabled = False
                logger.error("medusa_vllm: %s CUDA graph for batch %d disagrees with the eager "
                             "function (outputs %s); running it eagerly", self.name, b, diffs)
                return False
            if diffs:
                logger.warning("medusa_vllm: %s CUDA graph for batch %d: outputs %s differ from "
                               "the eager run by rounding", self.name, b, diffs)
        self.graphs[b] = (graph, outputs)
        sizes = sorted(self.graphs)
        self._padded = [next((c for c in sizes if c >= n), 0) for n in range(sizes[-1] + 1)]
        return True


_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def capture_stream(device) -> torch.cuda.Stream | None:
    """The one side stream every verify graph of ``device`` warms up and is captured on (None
    off CUDA). PyTorch keeps a cuBLAS workspace per (handle, stream) for the life of the process
    (32 MiB each on an H100): a new stream per capture left one behind per graph, up to the 32
    streams of its pool — 1.0 GiB beside the adaptive tree's 60 verify graphs on an H200
    (d464a94), which vLLM's KV-cache plan had no room for."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _CAPTURE_STREAMS[index]


@contextlib.contextmanager
def on_stream(stream: torch.cuda.Stream | None):
    """Runs the block on ``stream`` (None: where it is), ordered after the current stream's
    work and before its later work."""
    if stream is None:
        yield None
        return
    outer = torch.cuda.current_stream(stream.device)
    stream.wait_stream(outer)
    try:
        with torch.cuda.stream(stream):
            yield stream
    finally:
        outer.wait_stream(stream)


class _sync_debug_off:
    def __enter__(self):
        self.mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self.mode)
