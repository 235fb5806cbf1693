"""Per-request sampling parameters and the target distribution they define (pure torch).

Random numbers come from one of three sources, per request row:
- a key (seed, counter) of the batch (``SamplingBatch.keys``, vLLM's V2 runner: every request has
  a seed, the counter is its computed-token count): a counter-based hash, :func:`keyed_uniforms`,
  pure tensor ops (no per-request launches, no state; a CUDA graph computes it in place);
- the request's own ``torch.Generator`` (``SamplingBatch.generators``, vLLM's V1 runner for
  seeded requests);
- the default generator otherwise.
A seeded request reproduces its own draws whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from medusa_vllm.kernels import keyed_uniforms

_EPS_TEMPERATURE = 1e-5

# (x [M, V] float32 logits, k [M] int32 (vocab = off), p [M] float32 (1 = off)) -> x with the
# tokens outside each row's top-k, then top-p nucleus, set to -inf (may work in place)
TopKTopP = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_top_k_top_p: TopKTopP | None = None  # an engine's own op (set_top_k_top_p); None: the sort below
# (logits [M, V], temperature [M] float32, top_k [M] int32 | None, top_p [M] float32 | None,
#  min_p [M] float32 | None) -> [M, V] float32 probabilities: the whole filtered distribution in
# one op (medusa_vllm.kernels.target_probs; set_target_probs), used for rows that filter
_target_probs_op: Callable[..., torch.Tensor] | None = None


def set_top_k_top_p(fn: TopKTopP | None) -> TopKTopP | None:
    """Filter every target distribution with ``fn`` instead of :func:`apply_top_k_top_p_ref`
    (an engine adapter installs its engine's own op, so the verified distribution is the one
    that engine samples from without speculation); returns the one it replaces."""
    global _top_k_top_p
    old, _top_k_top_p = _top_k_top_p, fn
    return old


def set_target_probs(fn: Callable[..., torch.Tensor] | None) -> Callable[..., torch.Tensor] | None:
    """Compute filtered target distributions (min-p, top-k or top-p on) with ``fn`` in one
    call, e.g. :func:`medusa_vllm.kernels.target_probs`, instead of the temperature division,
    the filter and the softmax; returns the one it replaces."""
    global _target_probs_op
    old, _target_probs_op = _target_probs_op, fn
    return old


def filters_with_target_probs() -> bool:
    """Whether the installed filter is a whole-distribution op (:func:`set_target_probs`)."""
    return _target_probs_op is not None


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [B] float32; <= 1e-5 means greedy
    top_k: torch.Tensor  # [B] int64; <= 0 or >= vocab means off
    top_p: torch.Tensor  # [B] float32; >= 1 means off
    generators: dict[int, torch.Generator] | None = None  # request row -> its own generator
    filtered: bool = True  # host-known: some row uses top-k/top-p (False skips the sort)
    min_p: torch.Tensor | None = None  # [B] float32, 0 = off (None: no request uses it)
    keys: torch.Tensor | None = None  # [B, 2] int64 (seed, counter): rows' random numbers (keyed_uniforms)

    @property
    def is_greedy(self) -> torch.Tensor:  # [B] bool
        return self.temperature <= _EPS_TEMPERATURE

    @property
    def target_temperature(self) -> torch.Tensor:  # [B] the temperature, 1 for greedy rows
        return torch.where(self.is_greedy, torch.ones_like(self.temperature), self.temperature)

    def take(self, rows: torch.Tensor) -> SamplingBatch:
        """The parameters of ``rows`` (a [M] index into the batch), e.g. one per tree row."""
        return SamplingBatch(
            self.temperature[rows], self.top_k[rows], self.top_p[rows], None, self.filtered,
            None if self.min_p is None else self.min_p[rows], None if self.keys is None else self.keys[rows],
        )

    @classmethod
    def greedy(cls, batch: int, device: torch.device | str = "cpu") -> SamplingBatch:
        return cls(
            torch.zeros(batch, device=device),
            torch.zeros(batch, dtype=torch.int64, device=device),
            torch.ones(batch, device=device),
            filtered=False,
        )


@dataclass
class TargetParams:
    """A batch's sampling parameters as :func:`target_probs_of` applies them, prepared once
    for every call of a step (a tree walk filters B rows per level; each preparation is a few
    kernels)."""

    temperature: torch.Tensor  # [M, 1] float32 (1 for greedy rows: their point mass replaces it)
    top_k: torch.Tensor | None  # [M] int32 (vLLM's op takes it so), vocab = off (None: no row filters)
    top_p: torch.Tensor | None  # [M] float32, 1 = off
    min_p: torch.Tensor | None  # [M] float32, 0 = off (None: no row uses it)
    greedy: torch.Tensor  # [M, 1] bool: rows whose distribution is the point mass at their argmax

    @classmethod
    def of(cls, sampling: SamplingBatch, vocab: int) -> TargetParams:
        temp = sampling.target_temperature
        greedy = sampling.is_greedy.unsqueeze(1)
        k, p = sampling.top_k, sampling.top_p
        if not sampling.filtered:
            return cls(temp.unsqueeze(1), None, None, sampling.min_p, greedy)
        return cls(temp.unsqueeze(1), torch.where((k > 0) & (k < vocab), k, vocab).int(),
                   torch.where(p < 1.0, p, 1.0).float(), sampling.min_p, greedy)


def target_probs(logits: torch.Tensor, sampling: SamplingBatch) -> torch.Tensor:
    """[M, V] logits -> [M, V] float32 probabilities after temperature, min-p, top-k and top-p
    (vLLM's sampler's order).

    A greedy request's row is the point mass at its argmax (of equal largest logits the lowest
    token id, ``torch.argmax``'s rule and vLLM's greedy sampler's), so the rejection walk
    accepts exactly the greedy rule's tokens (:func:`medusa_vllm.verify.verify`).
    """
    return target_probs_of(logits, TargetParams.of(sampling, logits.shape[-1]))


def target_probs_of(logits: torch.Tensor, params: TargetParams) -> torch.Tensor:
    """:func:`target_probs` with the parameters prepared (:meth:`TargetParams.of`)."""
    if _target_probs_op is not None and (params.top_k is not None or params.min_p is not None):
        probs = _target_probs_op(logits, params.temperature.view(-1), params.top_k, params.top_p, params.min_p)
    else:
        x = logits / params.temperature  # float32 (bf16 / float32 promotes: one kernel, the same values)
        if params.min_p is not None:
            x = _apply_min_p(x, params.min_p)
        if params.top_k is not None:
            x = (_top_k_top_p or apply_top_k_top_p_ref)(x, params.top_k, params.top_p)
        probs = torch.softmax(x, dim=-1)
    # greedy rows: 1 at the argmax, 0 elsewhere (four kernels on [M, V]; no host sync)
    point = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(params.greedy, point, probs)


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
    drop = sorted_x < sorted_x.gather(1, (k.long().clamp(1, vocab) - 1).unsqueeze(1))
    probs = torch.softmax(sorted_x.masked_fill(drop, float("-inf")), dim=-1)
    # keep the smallest prefix whose mass reaches p (the first token always stays); p = 1 keeps
    # every token (a float32 cumsum reaches 1 before the tail of a peaked row)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= (mass_before >= p.unsqueeze(1)) & (p < 1).unsqueeze(1)
    drop[:, 0] = False
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, sorted_x)


def _row_uniforms(batch: int, n: int, sampling: SamplingBatch, device: torch.device | str) -> torch.Tensor:
    """[B, n] uniforms: keyed rows hashed, generator rows from their generator, others from the
    default generator."""
    if sampling.keys is not None:
        return keyed_uniforms(sampling.keys[:batch].to(device), n)
    u = torch.rand((batch, n), device=device)
    for row, gen in (sampling.generators or {}).items():
        if row < batch:
            u[row] = torch.rand((n,), device=device, generator=gen)
    return u


@dataclass
class StepRandomness:
    """The random numbers one verification step consumes, drawn up front so the step itself is
    a deterministic function of its inputs (what a CUDA graph replays): per request, uniforms
    for the acceptance tests of each tree level and child rank, and one for its sampled token
    (the inverse-CDF draw of :func:`sample`). :meth:`flat` packs them [B, L*C + 1], the layout
    that :meth:`from_flat` and the fixed-shape sampled step read."""

    accept: torch.Tensor  # [B, L, C] float32 uniforms in [0, 1): level, child rank
    final: torch.Tensor  # [B] float32 uniform in [0, 1): the final token's draw

    @staticmethod
    def flat_width(levels: int, width: int) -> int:
        """Numbers per request in the :meth:`flat` layout: L*C acceptance uniforms, then the final one."""
        return levels * width + 1

    @classmethod
    def draw(cls, batch: int, levels: int, width: int, sampling: SamplingBatch,
             device: torch.device | str) -> StepRandomness:
        return cls.from_flat(_row_uniforms(batch, cls.flat_width(levels, width), sampling, device), levels)

    @classmethod
    def from_flat(cls, flat: torch.Tensor, levels: int) -> StepRandomness:
        b = flat.shape[0]
        return cls(flat[:, :-1].reshape(b, levels, -1), flat[:, -1])

    def flat(self) -> torch.Tensor:
        return torch.cat([self.accept.flatten(1), self.final[:, None]], dim=1)


def sample(probs: torch.Tensor, sampling: SamplingBatch, u: torch.Tensor | None = None) -> torch.Tensor:
    """[B, V] probabilities (unnormalised is fine) -> [B] int64 tokens by the inverse CDF (no
    host sync): the first token whose cumulative mass, in float64, exceeds ``u`` [B] uniforms
    in [0, 1) times the row's mass (drawn per :func:`_row_uniforms` if None). A token of zero
    probability is never drawn; a row without mass gives its argmax (token 0)."""
    if u is None:
        u = _row_uniforms(probs.shape[0], 1, sampling, probs.device)[:, 0]
    cdf = probs.double().cumsum(dim=-1)  # [B, V]
    x = u.double()[:, None] * cdf[:, -1:]
    tok = torch.searchsorted(cdf, x, right=True)[:, 0]
    return torch.where(tok < probs.shape[-1], tok, probs.argmax(dim=-1))
