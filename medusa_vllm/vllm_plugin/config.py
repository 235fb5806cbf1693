"""medusa_vllm's speculative settings and their translation into vLLM's own config.

Users write ``{"method": "medusa_vllm", "model": HEADS, "tree": ..., "acceptance": ...}``
(``--speculative-config``) or ``--speculative-model medusa_vllm|HEADS``. vLLM 0.26 validates
``method`` against a fixed list, so before vLLM sees it the plugin rewrites it into the
``custom_class`` method (our proposer class), carries these settings in
``additional_config["medusa_vllm"]`` and selects our worker. Everything is checked here, in the
front-end process, so a bad heads path, a heads checkpoint that does not fit the model or an
invalid tree stops vLLM at start-up with one line that names the problem.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from medusa_vllm.admission import GPU_GROUP
from medusa_vllm.adaptive import POLICIES as ADAPTIVE_POLICIES
from medusa_vllm.tree import TokenTree, get_tree

METHOD = "medusa_vllm"
PROPOSER_CLASS = "medusa_vllm.vllm_plugin.proposer.MedusaTreeProposer"
ACCEPTANCE_RULES = ("rejection", "typical")
# tree attention: "auto" = the compiled csrc kernel (the PyTorch reference ops if the extension is
# not built), "kernel" = the compiled kernel or an error, "reference" = the PyTorch reference
# (debugging: it syncs the host, so eager mode only), "xformers" = xformers' tree attention
# (xformers 0.0.35, GPU, eager mode only; 6.4x slower than ours on the H100)
ATTENTION_CHOICES = ("auto", "kernel", "reference", "xformers")
# vLLM 0.26's model runner the trees run in: "v1" (vLLM's choice for any method but its EAGLE
# family: every feature) or "v2" (its GPU-side input preparation; greedy and sampled requests
# speculate, with penalties, logit biases and raw logprobs; no structured output; the
# load-adaptive tree with asynchronous scheduling; GPU only: vllm_plugin/runner_v2.py)
RUNNERS = ("v1", "v2")
# keys of our speculative config; vLLM's own keys we accept alongside them
_VLLM_KEYS = ("method", "model", "num_speculative_tokens")


class MedusaConfigError(ValueError):
    """A bad medusa_vllm setting; the message says what is wrong and what to do."""


@dataclass
class MedusaSpecConfig:
    """Everything the engine needs to run Medusa trees; validated in ``__post_init__``."""

    heads: str  # directory (or file) of the heads checkpoint, resolved
    tree: list[list[int]]  # the main tree, BFS order
    acceptance: str = "rejection"  # sampled requests: lossless "rejection" or Medusa "typical"
    typical_eps: float = 0.09
    typical_delta: float = 0.3
    adaptive: bool = False  # shrink the tree as the batch grows (load-adaptive)
    adaptive_trees: list[list[list[int]]] = field(default_factory=list)  # smaller trees to pick from
    adaptive_max_tokens: int = 0  # token budget per step the adaptive policy aims for (0 = auto)
    # "measured": the tree with the most tokens per second by the engine's own step times (timed
    # in its scheduler); "budget": the largest tree within adaptive_max_tokens (medusa_vllm.adaptive)
    adaptive_policy: str = "measured"
    head_accuracies: list[list[float]] | None = None  # the heads' calibration: τ per tree estimate
    attention: str = "auto"  # tree attention: ATTENTION_CHOICES
    topk: int = 10  # candidates taken per head
    # GPU: verification + next drafts of uniform greedy steps replayed as one CUDA graph per batch
    cuda_graphs: bool = True
    runner: str = "v1"  # RUNNERS
    # waiting requests admitted in groups of admit_group (1: at once, vLLM's way; 0: the plugin
    # picks, admission.GPU_GROUP on a GPU and 1 on a CPU), the oldest held at most admit_wait
    # steps: fewer steps that carry a prefill (medusa_vllm.admission)
    admit_group: int = 0
    admit_wait: int = 8

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise MedusaConfigError(f"medusa_vllm: runner {self.runner!r} is not one of {RUNNERS}")
        if self.acceptance not in ACCEPTANCE_RULES:
            raise MedusaConfigError(
                f"medusa_vllm: acceptance {self.acceptance!r} is not one of {ACCEPTANCE_RULES}"
            )
        if self.attention not in ATTENTION_CHOICES:
            raise MedusaConfigError(
                f"medusa_vllm: attention {self.attention!r} is not one of {ATTENTION_CHOICES}"
            )
        if self.adaptive_policy not in ADAPTIVE_POLICIES:
            raise MedusaConfigError(
                f"medusa_vllm: adaptive_policy {self.adaptive_policy!r} is not one of {ADAPTIVE_POLICIES}"
            )
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= low
                   for v, low in ((self.admit_group, 0), (self.admit_wait, 1))):
            raise MedusaConfigError(
                f"medusa_vllm: admit_group ({self.admit_group!r}) must be an integer >= 0 and admit_wait "
                f"({self.admit_wait!r}) one >= 1 (admit_group 1: new requests are admitted at once; "
                "0: the plugin picks, groups of 4 on a GPU)")
        if not 0 < self.typical_eps < 1 or not self.typical_delta > 0:
            raise MedusaConfigError("medusa_vllm: typical_eps must be in (0, 1) and typical_delta > 0")
        for spec in [self.tree, *self.adaptive_trees]:
            try:
                TokenTree.from_choices(spec, topk=self.topk)
            except ValueError as e:
                raise MedusaConfigError(f"medusa_vllm: invalid tree: {e}") from None

    @property
    def trees(self) -> list[TokenTree]:
        """The main tree first, then the adaptive alternatives (largest to smallest)."""
        out = [TokenTree.from_choices(self.tree)]
        out += sorted((TokenTree.from_choices(t) for t in self.adaptive_trees), key=len, reverse=True)
        return out

    @property
    def max_nodes(self) -> int:
        return max(len(t) for t in self.trees)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MedusaSpecConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ------------------------------------------------------------------------- user options
_USER_KEYS = {
    "method",
    "model",
    "heads",
    "num_speculative_tokens",
    "tree",
    "acceptance",
    "typical_eps",
    "typical_delta",
    "adaptive",
    "adaptive_trees",
    "adaptive_max_tokens",
    "adaptive_policy",
    "attention",
    "cuda_graphs",
    "runner",
    "admit_group",
    "admit_wait",
}


def is_medusa_request(spec: dict[str, Any] | None) -> bool:
    """Does a user's speculative config ask for medusa_vllm?"""
    if not spec:
        return False
    return spec.get("method") == METHOD or (spec.get("method") is None and spec.get("model") == METHOD)


def target_sizes(model: str, trust_remote_code: bool = False, revision: str | None = None) -> tuple[int, int]:
    """Hidden size and vocab of the target model, read from its config.json."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code, revision=revision)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(text.hidden_size), int(text.vocab_size)


def resolve(spec: dict[str, Any], model: str, hidden_size: int, vocab_size: int) -> MedusaSpecConfig:
    """Validate a user's medusa_vllm speculative config against the target model."""
    from medusa_vllm.checkpoint import CheckpointError, load_heads_config

    unknown = sorted(set(spec) - _USER_KEYS)
    if unknown:
        raise MedusaConfigError(
            f"medusa_vllm: unknown speculative config key(s) {unknown}; "
            f"known keys: {sorted(_USER_KEYS)}"
        )
    heads = resolve_heads_path(spec.get("heads") or spec.get("model"), model)
    try:
        heads_cfg = load_heads_config(heads, hidden_size=hidden_size, vocab_size=vocab_size)
    except CheckpointError as e:
        raise MedusaConfigError(str(e)) from None
    tree_spec = spec.get("tree") or heads_cfg.tree or "default-63"
    try:
        tree = get_tree(tree_spec, num_heads=heads_cfg.num_heads, topk=10)
    except ValueError as e:
        raise MedusaConfigError(f"medusa_vllm: invalid tree: {e}") from None
    adaptive = spec.get("adaptive", False)
    adaptive_trees = spec.get("adaptive_trees")
    if adaptive and adaptive_trees is None:
        adaptive_trees = default_adaptive_trees(tree, heads_cfg.num_heads)
    trees = []
    for t in adaptive_trees or []:
        try:
            trees.append(get_tree(t, num_heads=heads_cfg.num_heads, topk=10).choices())
        except ValueError as e:
            raise MedusaConfigError(f"medusa_vllm: invalid adaptive tree: {e}") from None
    n = spec.get("num_speculative_tokens")
    max_nodes = max([len(tree)] + [len(t) for t in trees])
    if n is not None and int(n) != max_nodes:
        raise MedusaConfigError(
            f"medusa_vllm: num_speculative_tokens={n} but the tree has {max_nodes} nodes; leave "
            "num_speculative_tokens out (it is the tree size) or pick a tree of that size"
        )
    cuda_graphs = spec.get("cuda_graphs", True)
    if not isinstance(cuda_graphs, bool):
        raise MedusaConfigError(
            f"medusa_vllm: cuda_graphs must be true or false (JSON booleans), got {cuda_graphs!r}"
        )
    return MedusaSpecConfig(
        heads=str(heads),
        tree=tree.choices(),
        acceptance=spec.get("acceptance", "rejection"),
        typical_eps=float(spec.get("typical_eps", 0.09)),
        typical_delta=float(spec.get("typical_delta", 0.3)),
        adaptive=bool(adaptive),
        adaptive_trees=trees,
        adaptive_max_tokens=int(spec.get("adaptive_max_tokens", 0)),
        adaptive_policy=spec.get("adaptive_policy", "measured"),
        head_accuracies=heads_cfg.head_accuracies,
        attention=spec.get("attention", "auto"),
        cuda_graphs=cuda_graphs,
        runner=str(spec.get("runner", "v1")),
        admit_group=int_option(spec, "admit_group", "MEDUSA_VLLM_ADMIT_GROUP", 0),
        admit_wait=int_option(spec, "admit_wait", "MEDUSA_VLLM_ADMIT_WAIT", 8),
    )


def admission_group(admit_group: int, on_cpu: bool, custom_scheduler: bool) -> int:
    """The speculative config's ``admit_group``, with 0 (the default) resolved: groups of
    :data:`medusa_vllm.admission.GPU_GROUP` on a GPU, where a step that carries a prefill costs
    several graphed tree steps; 1 (at once, vLLM's way) on a CPU, or where the user runs their
    own scheduler (``--scheduler-cls``: the groups live in medusa_vllm's)."""
    if admit_group:
        return admit_group
    return 1 if on_cpu or custom_scheduler else GPU_GROUP


def int_option(spec: dict[str, Any], key: str, env: str, default: int) -> Any:
    """``spec[key]``, else the environment's ``env`` (a benchmark's A/B of one configuration),
    else ``default``; an integer, or the value as given for ``__post_init__`` to refuse."""
    value = spec.get(key, os.environ.get(env, default))
    try:
        return int(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else value
    except ValueError:
        return value


def default_adaptive_trees(tree: TokenTree, num_heads: int) -> list[list[list[int]]]:
    """Smaller trees the load-adaptive policy may fall back to: the named sparse trees smaller
    than ``tree`` and a top-1 chain (vLLM's built-in Medusa shape)."""
    out = []
    for name in ("sparse-31", "sparse-15", "sparse-7"):
        t = get_tree(name)
        if len(t) < len(tree) and t.depth <= num_heads:
            out.append(t.choices())
    out.append(TokenTree.chain(min(num_heads, 3)).choices())
    return out


def resolve_heads_path(value: str | None, model: str) -> Path:
    """``None``/``"medusa_vllm"``: heads next to the model (``MODEL/medusa_heads``) or, for the
    bundled model, the heads shipped in the package. Otherwise a path that must exist."""
    if value in (None, METHOD):
        beside = Path(model) / "medusa_heads"
        if beside.exists():
            return beside
        from medusa_vllm.bundled import bundled_heads_path, is_bundled_model

        bundled = bundled_heads_path()
        if is_bundled_model(model) and bundled is not None:
            return bundled
        raise MedusaConfigError(
            f"medusa_vllm: no Medusa heads for model {model!r}: none at {beside} and it is not "
            "the bundled model; pass the heads with --speculative-model /path/to/heads (train "
            "them with python -m training.train)"
        )
    path = Path(value).expanduser()
    if not path.exists():
        raise MedusaConfigError(
            f"medusa_vllm: heads path {str(path)!r} does not exist; pass a directory written by "
            "python -m training.train (or a FasterDecoding/vLLM Medusa checkpoint)"
        )
    return path.resolve()


def parse_json_option(value: Any, what: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise MedusaConfigError(f"medusa_vllm: {what} is not valid JSON: {e}") from None
    return value
