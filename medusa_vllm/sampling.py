"""Per-request sampling parameters and the target distribution they define (pure torch).

Random numbers come from the default generator, except for requests that carry their own
``torch.Generator`` (seeded requests), whose rows are drawn from it: the same convention as
vLLM's sampler, so a seeded request reproduces its own draws whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

_EPS_TEMPERATURE = 1e-5

# (x [M, V] float32 logits, k [M] int64 (vocab = off), p [M] float32 (1 = off)) -> x with the
# tokens outside each row's top-k, then top-p nucleus, set to -inf (may work in place)
TopKTopP = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_top_k_top_p: TopKTopP | None = None  # an engine's own op (set_top_k_top_p); None: the sort below


def set_top_k_top_p(fn: TopKTopP | None) -> TopKTopP | None:
    """Filter every target distribution with ``fn`` instead of :func:`apply_top_k_top_p_ref`
    (an engine adapter installs its engine's own op, so the verified distribution is the one
    that engine samples from without speculation); returns the one it replaces."""
    global _top_k_top_p
    old, _top_k_top_p = _top_k_top_p, fn
    return old


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [B] float32; <= 1e-5 means greedy
    top_k: torch.Tensor  # [B] int64; <= 0 or >= vocab means off
    top_p: torch.Tensor  # [B] float32; >= 1 means off
    generators: dict[int, torch.Generator] | None = None  # request row -> its own generator
    filtered: bool = True  # host-known: some row uses top-k/top-p (False skips the sort)
    min_p: torch.Tensor | None = None  # [B] float32, 0 = off (None: no request uses it)

    @property
    def is_greedy(self) -> torch.Tensor:  # [B] bool
        return self.temperature <= _EPS_TEMPERATURE

    def take(self, rows: torch.Tensor) -> SamplingBatch:
        """The parameters of ``rows`` (a [M] index into the batch), e.g. one per tree row."""
        return SamplingBatch(
            self.temperature[rows], self.top_k[rows], self.top_p[rows], None, self.filtered,
            None if self.min_p is None else self.min_p[rows],
        )

    @classmethod
    def greedy(cls, batch: int, device: torch.device | str = "cpu") -> SamplingBatch:
        return cls(
            torch.zeros(batch, device=device),
            torch.zeros(batch, dtype=torch.int64, device=device),
            torch.ones(batch, device=device),
            filtered=False,
        )


def target_probs(logits: torch.Tensor, sampling: SamplingBatch) -> torch.Tensor:
    """[M, V] logits -> [M, V] float32 probabilities after temperature, min-p, top-k and top-p
    (vLLM's sampler's order).

    Rows of greedy requests get temperature 1 (their probabilities are not used to sample).
    """
    temp = torch.where(sampling.is_greedy, torch.ones_like(sampling.temperature), sampling.temperature)
    x = logits.float() / temp.unsqueeze(1)
    vocab = x.shape[-1]
    k = sampling.top_k
    p = sampling.top_p
    use_k = (k > 0) & (k < vocab)
    use_p = p < 1.0
    if sampling.min_p is not None:
        x = _apply_min_p(x, sampling.min_p)
    if sampling.filtered:
        x = (_top_k_top_p or apply_top_k_top_p_ref)(x, torch.where(use_k, k, vocab), torch.where(use_p, p, 1.0))
    return torch.softmax(x, dim=-1)


def _apply_min_p(x: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask logits whose probability is below ``min_p`` [M] times the row's largest (vLLM's
    ``MinPLogitsProcessor``, the same operations; min_p 0 masks nothing)."""
    probs = torch.softmax(x, dim=-1)
    threshold = torch.amax(probs, dim=-1, keepdim=True).mul_(min_p.unsqueeze(1))
    return x.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p_ref(x: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus with -inf (sort-based: one sort
    of every row, the reference; slow on a GPU for many rows of a large vocabulary)."""
    sorted_x, order = x.sort(dim=-1, descending=True)  # [M, V]
    vocab = x.shape[-1]
    # top-k keeps every logit tied with the k-th largest (vLLM's rule: logits >= the k-th)
    drop = sorted_x < sorted_x.gather(1, (k.clamp(1, vocab) - 1).unsqueeze(1))
    probs = torch.softmax(sorted_x.masked_fill(drop, float("-inf")), dim=-1)
    # keep the smallest prefix whose mass reaches p (the first token always stays)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= p.unsqueeze(1)
    drop[:, 0] = False
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, sorted_x)


@dataclass
class StepRandomness:
    """The random numbers one verification step consumes, drawn up front so the step itself is
    a deterministic function of its inputs (what a CUDA graph replays): per request, uniforms
    for the acceptance tests of each tree level and exponentials for its one sampled token.
    Rows of requests with their own generator are drawn from it (reproducible per request)."""

    accept: torch.Tensor  # [B, L, C] float32 uniforms in [0, 1): level, child rank
    noise: torch.Tensor  # [B, V] float32 Exp(1): the exponential race of the final token

    @classmethod
    def draw(cls, batch: int, levels: int, width: int, vocab: int, sampling: SamplingBatch,
             device: torch.device | str) -> StepRandomness:
        accept = torch.rand((batch, levels, width), device=device)
        for row, gen in (sampling.generators or {}).items():
            if row < batch:
                accept[row] = torch.rand((levels, width), device=device, generator=gen)
        return cls(accept, exponential_noise(batch, vocab, sampling, device))


def exponential_noise(batch: int, vocab: int, sampling: SamplingBatch, device: torch.device | str) -> torch.Tensor:
    """[B, V] float32 Exp(1), a seeded request's row drawn from its own generator."""
    noise = torch.empty((batch, vocab), device=device).exponential_()
    for row, gen in (sampling.generators or {}).items():
        if row < batch:
            noise[row].exponential_(generator=gen)
    return noise


def sample(probs: torch.Tensor, sampling: SamplingBatch, noise: torch.Tensor | None = None) -> torch.Tensor:
    """[B, V] probabilities -> [B] int64 tokens by the exponential race (no host sync), with
    ``noise`` [B, V] Exp(1) if given (else drawn, per-request generators honoured)."""
    if noise is None:
        noise = exponential_noise(probs.shape[0], probs.shape[1], sampling, probs.device)
    return (probs / noise).argmax(dim=-1)
