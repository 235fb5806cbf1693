"""Reference Medusa engine: plain PyTorch + transformers, small and obviously correct.

The oracle for tests and the τ evaluator for training, not the product path (that is vLLM).
One step for a batch of B requests, T tree nodes, Q = T + 1 slots (slot 0 = the root, the last
emitted token, not yet in the KV cache):

1. propose: the heads on the hidden state of the last cached token give a top-k per head; node i
   takes candidate ``ranks[i]`` of head ``depth(i) - 1``;
2. one forward of the base model over [root, node_1..node_T], positions = length + depth, under a
   4-D mask: every cached token of the request plus the tree's ancestors;
3. verify with :func:`medusa_vllm.verify.verify` (greedy, lossless rejection or typical);
4. commit: keep the root and the accepted nodes in the KV cache (a gather), emit the tokens, and
   the hidden state of the last accepted node feeds the next proposal.

The KV cache is one right-padded tensor per layer ([B, kv_heads, L, head_dim]) plus the valid
length of each row; padding is masked out, so requests stay ragged at every step. Finished
requests leave the batch. Works with transformers models that take a custom 4-D float mask and
explicit ``position_ids`` (Llama, Qwen2, ...) with the eager or sdpa attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from medusa_vllm.heads import MedusaHeads
from medusa_vllm.sampling import SamplingBatch, sample, target_probs
from medusa_vllm.tree import TokenTree, get_tree
from medusa_vllm.tree_tensors import TreeTensors
from medusa_vllm.verify import verify

KV = list[tuple[Tensor, Tensor]]  # per layer (keys, values), each [B, kv_heads, L, head_dim]


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # per request: new tokens (prompt excluded), cut after EOS / max
    steps: list[int]  # per request: verification steps (the prefill is not one)
    tau: float  # tokens the verifier emitted per step (accepted + 1), before any cut; 0 if no step


@dataclass
class _Batch:
    """The running requests; row r is request ``rows[r]``."""

    rows: list[int]
    kv: KV  # right padded; entries at or past lengths[r] are garbage, masked out
    lengths: Tensor  # [B] int64 valid KV entries per row
    root: Tensor  # [B] int64 last emitted token (not in the KV cache)
    hidden: Tensor  # [B, H] final-norm hidden state of the last cached token

    def select(self, keep: list[int]) -> _Batch:
        idx = torch.tensor(keep, dtype=torch.int64, device=self.root.device)
        kv = [(k[idx], v[idx]) for k, v in self.kv]
        rows = [self.rows[i] for i in keep]
        return _Batch(rows, kv, self.lengths[idx], self.root[idx], self.hidden[idx])


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, q, kv] bool (True = attend) -> [B, 1, q, kv] float mask (0 or the dtype's min)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def tree_attention_mask(lengths: Tensor, past: int, tree_mask: Tensor) -> Tensor:
    """[B, Q, past + Q] bool: the first ``lengths[b]`` cached tokens + the tree's ancestors.

    lengths [B] int64, past = padded cache length, tree_mask [Q, Q] bool (row i sees column j)."""
    b, q = lengths.shape[0], tree_mask.shape[0]
    cached = torch.arange(past, device=lengths.device) < lengths.unsqueeze(1)  # [B, past]
    return torch.cat([cached.unsqueeze(1).expand(b, q, past), tree_mask.expand(b, q, q)], dim=2)


def commit_kv(kv: KV, lengths: Tensor, past: int, keep_slots: Tensor) -> tuple[KV, Tensor]:
    """Keep the cached tokens and the given new slots of each row, compacted after them.

    kv: per layer [B, h, past + Q, d] (the cache before the step + Q new slots); lengths [B];
    keep_slots [B, S] new slots to keep, ascending, -1 pad -> (kv [B, h, W, d], lengths [B])."""
    n_keep = (keep_slots >= 0).sum(dim=1)  # [B]
    new_lengths = lengths + n_keep
    j = torch.arange(int(new_lengths.max()), device=lengths.device).unsqueeze(0)  # [1, W]
    slot = keep_slots.gather(1, (j - lengths.unsqueeze(1)).clamp(0, keep_slots.shape[1] - 1))
    src = torch.where(j < lengths.unsqueeze(1), j, past + slot.clamp_min(0))  # [B, W]

    def take(x: Tensor) -> Tensor:  # [B, h, past + Q, d] -> [B, h, W, d]
        return x.gather(2, src[:, None, :, None].expand(x.shape[0], x.shape[1], -1, x.shape[3]))

    return [(take(k), take(v)) for k, v in kv], new_lengths


class MedusaReference:
    """Medusa tree decoding of a transformers causal LM (``model.model`` + ``model.lm_head``)."""

    def __init__(
        self,
        model,
        heads: MedusaHeads,
        tree: TokenTree | str | list,
        *,
        lm_head_weight: Tensor | None = None,  # [V, H]; default: the model's output embeddings
        rule: str = "rejection",  # sampled requests: "rejection" (lossless) or "typical"
    ) -> None:
        self.model, self.heads, self.tree, self.rule = model, heads, get_tree(tree), rule
        if rule not in ("rejection", "typical"):
            raise ValueError(f"unknown acceptance rule {rule!r}: use 'rejection' or 'typical'")
        if self.tree.depth > heads.num_heads:
            raise ValueError(f"the tree has depth {self.tree.depth}: it needs at least that many "
                             f"heads, got {heads.num_heads}")
        if heads.config.hidden_size != model.config.hidden_size:
            raise ValueError(f"heads have hidden_size {heads.config.hidden_size}, the model "
                             f"{model.config.hidden_size}")
        if lm_head_weight is None:
            lm_head_weight = model.get_output_embeddings().weight
        self.lm_head_weight = lm_head_weight
        self.device = next(model.parameters()).device
        self.trees = TreeTensors.build([self.tree], self.device)
        self.depths = self.trees.depths[0]  # [Q]
        self.head_of_node = torch.from_numpy(self.tree.head_index).to(self.device)  # [T]
        self.rank_of_node = torch.from_numpy(self.tree.ranks[1:]).to(self.device)  # [T]

    # ------------------------------------------------------------------ the four steps
    def head_candidates(self, hidden: Tensor, seqs: list[list[int]]) -> Tensor:
        """hidden [B, H] -> [B, K, k] top-k token ids per head (k = tree.topk). ``seqs`` (prompt +
        tokens so far, root last) is unused here; it lets tests plug in an oracle drafter."""
        dtype = next(self.heads.parameters()).dtype
        logits = self.heads.logits(hidden.to(dtype), self.lm_head_weight.to(dtype))  # [B, K, V]
        return logits.topk(self.tree.topk, dim=-1).indices

    def propose(self, hidden: Tensor, seqs: list[list[int]]) -> Tensor:
        """-> drafts [B, T]: node i+1 holds candidate ranks[i] of head depth-1."""
        return self.head_candidates(hidden, seqs)[:, self.head_of_node, self.rank_of_node]

    def forward(self, tokens: Tensor, positions: Tensor, allowed: Tensor, kv: KV | None):
        """tokens, positions [B, q]; allowed [B, q, past + q] bool -> (hidden [B, q, H] final-norm,
        logits [B, q, V] float32, kv [B, h, past + q, d] per layer)."""
        cache = DynamicCache(ddp_cache_data=kv) if kv else DynamicCache()
        mask = additive_mask(allowed, self.model.dtype)
        out = self.model.model(input_ids=tokens, position_ids=positions, attention_mask=mask,
                               past_key_values=cache, use_cache=True)
        hidden = out.last_hidden_state
        logits = self.model.lm_head(hidden).float()
        return hidden, logits, [(layer.keys, layer.values) for layer in cache.layers]

    def prefill(self, prompts: list[list[int]], sampling: SamplingBatch) -> _Batch:
        """Right-padded prompts, causal mask; the root is the model's own next token."""
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(lengths.max())
        tokens = torch.zeros(len(prompts), width, dtype=torch.int64, device=self.device)
        for b, p in enumerate(prompts):
            tokens[b, : len(p)] = torch.tensor(p)
        pos = torch.arange(width, device=self.device)
        allowed = (pos[None, None, :] <= pos[None, :, None]) & (pos < lengths[:, None])[:, None, :]
        hidden, logits, kv = self.forward(tokens, pos.expand(len(prompts), -1), allowed, None)
        rows = torch.arange(len(prompts), device=self.device)
        last = logits[rows, lengths - 1]  # [B, V]
        greedy = bool(sampling.is_greedy.all())
        root = last.argmax(-1) if greedy else sample(target_probs(last, sampling), sampling)
        return _Batch(list(range(len(prompts))), kv, lengths, root, hidden[rows, lengths - 1])

    def step(self, batch: _Batch, seqs: list[list[int]], sampling: SamplingBatch):
        """One propose/verify/commit step -> (next batch, emitted tokens [B, D+1] -1 pad)."""
        b, q, past = len(batch.rows), self.tree.num_nodes + 1, batch.kv[0][0].shape[2]
        drafts = self.propose(batch.hidden, seqs)  # [B, T]
        tokens = torch.cat([batch.root.unsqueeze(1), drafts], dim=1)  # [B, Q]
        positions = batch.lengths.unsqueeze(1) + self.depths  # [B, Q]
        allowed = tree_attention_mask(batch.lengths, past, self.trees.masks[0])
        hidden, logits, kv = self.forward(tokens, positions, allowed, batch.kv)
        rows = torch.arange(b, device=self.device)
        row_of_node = rows.unsqueeze(1) * q + torch.arange(q, device=self.device)  # [B, Q]
        num_nodes = torch.full((b,), q - 1, device=self.device)  # [B] the whole tree
        out = verify(self.rule, logits.flatten(0, 1), row_of_node, drafts, num_nodes,
                     torch.zeros_like(rows), self.trees, sampling,
                     all_greedy=bool(sampling.is_greedy.all()))
        keep = torch.cat([torch.zeros_like(out.accepted[:, :1]), out.accepted], dim=1)  # root + path
        kv, lengths = commit_kv(kv, batch.lengths, past, keep)
        root = out.tokens[rows, out.num_accepted]  # the bonus / correction token
        return _Batch(batch.rows, kv, lengths, root, hidden[rows, out.last_node]), out.tokens

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        seed: int = 0,  # request i samples from its own generator seeded with seed + i
    ) -> GenerationResult:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: need at least one prompt, each with at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
            raise ValueError(f"generate: need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got "
                             f"{temperature}, {top_k}, {top_p}")
        eos, n = _as_set(eos_token_id), len(prompts)
        gens = [torch.Generator(self.device).manual_seed(seed + i) for i in range(n)]

        def sampling_of(rows: list[int]) -> SamplingBatch:
            full = torch.ones(len(rows), device=self.device)
            return SamplingBatch(full * temperature, full.long() * top_k, full * top_p,
                                 {j: gens[r] for j, r in enumerate(rows)},
                                 filtered=top_k > 0 or top_p < 1.0)

        out: list[list[int]] = [[] for _ in range(n)]
        steps, emitted = [0] * n, 0
        batch = self.prefill([list(p) for p in prompts], sampling_of(list(range(n))))
        tokens = batch.root.unsqueeze(1)  # [B, 1]
        while True:
            running = [j for j, r in enumerate(batch.rows)
                       if _extend(out[r], tokens[j], max_new_tokens, eos)]
            if not running:
                break
            batch = batch.select(running) if len(running) < len(batch.rows) else batch
            seqs = [list(prompts[r]) + out[r] for r in batch.rows]
            batch, tokens = self.step(batch, seqs, sampling_of(batch.rows))
            emitted += int((tokens >= 0).sum())
            for r in batch.rows:
                steps[r] += 1
        total_steps = sum(steps)
        return GenerationResult(out, steps, emitted / total_steps if total_steps else 0.0)


def _as_set(eos_token_id: int | Sequence[int] | None) -> set[int]:
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())


def _extend(out: list[int], tokens: Tensor, max_new_tokens: int, eos: set[int]) -> bool:
    """Append tokens ([S], -1 pad) up to the first EOS or max_new_tokens; -> still running."""
    for t in tokens.tolist():
        if t < 0 or len(out) == max_new_tokens or (out and out[-1] in eos):
            break
        out.append(t)
    return len(out) < max_new_tokens and out[-1] not in eos


@torch.no_grad()
def greedy_decode(model, prompts: list[list[int]], max_new_tokens: int,
                  eos_token_id: int | Sequence[int] | None = None) -> list[list[int]]:
    """Plain greedy decoding with the base model, one request at a time: the test oracle."""
    eos = _as_set(eos_token_id)
    device = next(model.parameters()).device
    results = []
    for prompt in prompts:
        ids, cache, out = torch.tensor([prompt], device=device), DynamicCache(), []
        while len(out) < max_new_tokens and not (out and out[-1] in eos):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]
            out.append(int(logits.argmax()))
            ids = torch.tensor([[out[-1]]], device=device)
        results.append(out)
    return results
