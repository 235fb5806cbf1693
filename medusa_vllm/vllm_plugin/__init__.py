"""vLLM 0.26 plugin: Medusa tree speculative decoding (entry point ``vllm.general_plugins``).

``register()`` runs in every vLLM process (CLI, engine core, workers) and must be idempotent.
It patches three places of ``EngineArgs``, each a thin wrapper that calls the original:

- ``add_cli_args``: adds ``--speculative-model`` (``medusa_vllm`` or a heads path);
- ``from_cli_args``: folds ``--speculative-model`` into the speculative config;
- ``create_engine_config``: rewrites ``{"method": "medusa_vllm", ...}`` into vLLM's
  ``custom_class`` method + ``additional_config["medusa_vllm"]`` + our worker class, after
  validating heads, tree and options (:mod:`medusa_vllm.vllm_plugin.config`).

registers our tree attention backend as vLLM's CUSTOM backend, makes stop strings cut a
multi-token step at the right token (:mod:`.stops`), and lets medusa_vllm configs serve
``min_p`` and ``logit_bias`` (which vLLM refuses under speculative decoding). Everything that runs inside the
engine lives in :mod:`.runner` (model runner), :mod:`.proposer` (heads), :mod:`.attention`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

_REGISTERED = False
_V2_RUNNER = False  # this process built a medusa_vllm config with "runner": "v2"


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    share_vllm_logging()
    from vllm.engine.arg_utils import EngineArgs

    _patch_cli(EngineArgs)
    _patch_engine_config(EngineArgs)
    _patch_async_scheduling_check()
    _patch_min_p_and_logit_bias()
    _patch_runner_choice()
    _register_attention_backend()
    from medusa_vllm.vllm_plugin.stops import patch_stop_strings

    patch_stop_strings()


def share_vllm_logging() -> None:
    """medusa_vllm's log lines print where and as vLLM's do: its loggers ("medusa_vllm.*") are
    not under vLLM's "vllm" logger, whose handler vLLM configures, so without this only their
    warnings reached stderr (Python's last-resort handler) and the INFO lines — graphs
    captured, graph memory, the adaptive tree's table — were lost. Leaves a "medusa_vllm"
    logger that already has handlers (an application's own set-up) alone."""
    import vllm.logger  # noqa: F401 - configures the "vllm" logger (VLLM_CONFIGURE_LOGGING)

    ours, theirs = logging.getLogger("medusa_vllm"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level)
    ours.propagate = False


# vLLM's GPU backend that runs the rest of a step beside the tree kernel (prefill chunks), by
# MEDUSA_VLLM_PARENT_ATTENTION: "triton" (default) or "flash" (FlashAttention, as vLLM itself
# picks on GPUs that have it; its steps with a prefill spend less host time than Triton's)
PARENT_ATTENTION = {
    "triton": "medusa_vllm.vllm_plugin.attention_triton.MedusaTritonBackend",
    "flash": "medusa_vllm.vllm_plugin.attention_flash.MedusaFlashBackend",
}


def parent_attention_path(choice: str | None = None) -> str:
    """The CUSTOM backend's class path for ``choice`` (default: $MEDUSA_VLLM_PARENT_ATTENTION,
    else "triton"); a clear error for anything else."""
    choice = (choice if choice is not None else os.environ.get("MEDUSA_VLLM_PARENT_ATTENTION", "")) or "triton"
    if choice not in PARENT_ATTENTION:
        raise ValueError(f"MEDUSA_VLLM_PARENT_ATTENTION={choice!r}: give one of {sorted(PARENT_ATTENTION)} "
                         "(vLLM's backend for the prefill chunks beside the tree kernel)")
    return PARENT_ATTENTION[choice]


def _register_attention_backend() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, parent_attention_path())


# ----------------------------------------------------------------------------- CLI
def _patch_cli(engine_args_cls: Any) -> None:
    original_add = engine_args_cls.add_cli_args
    original_from = engine_args_cls.from_cli_args.__func__

    @functools.wraps(original_add)
    def add_cli_args(parser, *args, **kwargs):
        parser = original_add(parser, *args, **kwargs)
        try:
            parser.add_argument(
                "--speculative-model",
                dest="medusa_speculative_model",
                default=None,
                help="medusa_vllm: Medusa heads for tree speculative decoding: 'medusa_vllm' "
                "(heads found next to the model, or the bundled heads for the bundled model) "
                "or a path to a heads checkpoint. Tree and acceptance options go in "
                '--speculative-config, e.g. \'{"method": "medusa_vllm", "tree": "default-63", '
                '"acceptance": "typical"}\'.',
            )
        except Exception:  # already added (parser built twice)
            pass
        return parser

    def from_cli_args(cls, args):
        engine_args = original_from(cls, args)
        heads = getattr(args, "medusa_speculative_model", None)
        if heads is not None:
            from medusa_vllm.vllm_plugin.config import METHOD, parse_json_option

            spec = parse_json_option(engine_args.speculative_config, "--speculative-config") or {}
            spec = dict(spec)
            if spec.get("method") not in (None, METHOD):
                raise ValueError(
                    f"--speculative-model selects medusa_vllm but --speculative-config asks "
                    f"for method {spec['method']!r}; drop one of them"
                )
            spec["method"] = METHOD
            if heads != METHOD:
                spec.setdefault("model", heads)
            engine_args.speculative_config = spec
        return engine_args

    engine_args_cls.add_cli_args = staticmethod(add_cli_args)
    engine_args_cls.from_cli_args = classmethod(from_cli_args)


# ----------------------------------------------------------------------------- config
def _patch_engine_config(engine_args_cls: Any) -> None:
    original = engine_args_cls.create_engine_config

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        from medusa_vllm.vllm_plugin.config import is_medusa_request, parse_json_option

        spec = parse_json_option(self.speculative_config, "speculative_config")
        if getattr(self, "spec_method", None) == "medusa_vllm":  # --spec-method medusa_vllm
            spec = dict(spec or {}, method="medusa_vllm")
            if self.spec_model is not None:
                spec.setdefault("model", self.spec_model)
            self.spec_method = self.spec_model = None
        if is_medusa_request(spec):
            _rewrite_medusa_args(self, dict(spec))
        return original(self, *args, **kwargs)

    engine_args_cls.create_engine_config = create_engine_config


def _patch_async_scheduling_check() -> None:
    """vLLM 0.26 allows asynchronous scheduling only for its EAGLE-type drafters (and re-checks
    in every process). The medusa_vllm runner follows their protocol — drafts kept on the device,
    placeholder draft slots, device-side correction of the optimistic token counts — so an
    explicit ``async_scheduling=True`` is kept for medusa_vllm configs; the default stays off."""
    from vllm.config import VllmConfig

    original = VllmConfig.__post_init__
    if getattr(original, "_medusa_vllm", False):
        return

    @functools.wraps(original)
    def __post_init__(self, *args, **kwargs):
        want = bool((self.additional_config or {}).get("medusa_vllm")) and bool(
            self.scheduler_config.async_scheduling)
        if want:
            self.scheduler_config.async_scheduling = False  # past vLLM's method check
        original(self, *args, **kwargs)
        if want:
            self.scheduler_config.async_scheduling = True
            if self.model_config is not None:  # as vLLM does for async speculative decoding
                self.model_config.disable_cascade_attn = True

    __post_init__._medusa_vllm = True
    VllmConfig.__post_init__ = __post_init__

    # vLLM turns FULL CUDA graphs off (PIECEWISE only) whenever the draft count is dynamic. The
    # medusa_vllm runner captures and dispatches FULL graphs per uniform query length (each
    # adaptive tree's 1 + nodes, and 1 for no drafts); mixed steps run piecewise as usual.
    original_override = VllmConfig._maybe_override_dynamic_sd_cudagraph_mode

    @functools.wraps(original_override)
    def override(self, *args, **kwargs):
        if (self.additional_config or {}).get("medusa_vllm"):
            return None
        return original_override(self, *args, **kwargs)

    VllmConfig._maybe_override_dynamic_sd_cudagraph_mode = override


def _medusa_runner(vllm_config: Any) -> str | None:
    """The runner a medusa_vllm config asks for ("v1"/"v2"), None for any other config."""
    extra = (getattr(vllm_config, "additional_config", None) or {}).get("medusa_vllm")
    return extra.get("runner", "v1") if extra else None


def _patch_runner_choice() -> None:
    """vLLM 0.26 runs speculative methods outside its EAGLE family on the V1 runner and refuses
    them on V2. A medusa_vllm config picks its runner itself ("runner": "v1" by default, or
    "v2": :mod:`.runner_v2`), in every process (the scheduler follows the runner's protocol too),
    and is not in V2's list of unsupported features."""
    from vllm.config import VllmConfig

    prop = VllmConfig.use_v2_model_runner
    if getattr(prop.fget, "_medusa_vllm", False):
        return

    @functools.wraps(prop.fget)
    def use_v2_model_runner(self):
        runner = _medusa_runner(self)
        return prop.fget(self) if runner is None else runner == "v2"

    use_v2_model_runner._medusa_vllm = True
    VllmConfig.use_v2_model_runner = property(use_v2_model_runner)

    original = VllmConfig._get_v2_model_runner_unsupported_features

    @functools.wraps(original)
    def unsupported(self):
        out = original(self)
        if _medusa_runner(self) == "v2":
            method = getattr(self.speculative_config, "method", None)
            out = [f for f in out if f != f"speculative method '{method}'"]
        return out

    VllmConfig._get_v2_model_runner_unsupported_features = unsupported


def _is_medusa_spec(speculative_config: Any) -> bool:
    from medusa_vllm.vllm_plugin.config import PROPOSER_CLASS

    return (getattr(speculative_config, "method", None) == "custom_class"
            and getattr(speculative_config, "model", None) == PROPOSER_CLASS)


def _patch_min_p_and_logit_bias() -> None:
    """vLLM 0.26 refuses ``min_p`` and ``logit_bias`` under any speculative config (its rejection
    sampler ignores them) and then builds no min-p or logit-bias processor. medusa_vllm's
    verifier applies both per tree row (logit biases before the penalties, min-p after the
    temperature, as vLLM's sampler does), so for medusa_vllm configs the check is skipped and
    vLLM's builtin processors are built: they keep each request's values by batch index, and
    vLLM's own sampler applies them to requests without drafts. Custom logits processors stay
    refused (the tree rows would not see them)."""
    from vllm import SamplingParams
    from vllm.v1.worker import gpu_model_runner

    original_check = SamplingParams._validate_spec_decode
    if getattr(original_check, "_medusa_vllm", False):
        return

    @functools.wraps(original_check)
    def _validate_spec_decode(self, speculative_config):
        if speculative_config is not None and _is_medusa_spec(speculative_config):
            if _V2_RUNNER and self.structured_outputs is not None:
                raise ValueError('medusa_vllm: structured output is not served by the V2 runner; '
                                 'start the engine with "runner": "v1" in --speculative-config')
            return None
        return original_check(self, speculative_config)

    _validate_spec_decode._medusa_vllm = True
    SamplingParams._validate_spec_decode = _validate_spec_decode

    original_build = gpu_model_runner.build_logitsprocs

    @functools.wraps(original_build)
    def build_logitsprocs(vllm_config, device, is_pin_memory, is_pooling_model, custom_logitsprocs=()):
        if (vllm_config.speculative_config is not None and not is_pooling_model
                and (vllm_config.additional_config or {}).get("medusa_vllm")):
            from vllm.v1.sample.logits_processor import BUILTIN_LOGITS_PROCESSORS, LogitsProcessors

            if custom_logitsprocs:
                return original_build(vllm_config, device, is_pin_memory, is_pooling_model,
                                      custom_logitsprocs)  # vLLM's refusal
            return LogitsProcessors(ctor(vllm_config, device, is_pin_memory)
                                    for ctor in BUILTIN_LOGITS_PROCESSORS)
        return original_build(vllm_config, device, is_pin_memory, is_pooling_model, custom_logitsprocs)

    gpu_model_runner.build_logitsprocs = build_logitsprocs


def adaptive_summary(llm: Any) -> dict | None:
    """The measured load-adaptive tree's state in the engine's scheduler (``LLM`` object): τ per
    tree size, measured ms per step per batch-size bucket and draft count (0: none), and the
    current batch size -> draft count table; None when the rule is not in use."""
    core = llm.llm_engine.engine_core
    if hasattr(core, "call_utility"):  # the engine core in its own process (vLLM's default)
        return core.call_utility("medusa_adaptive")
    return core.engine_core.medusa_adaptive()  # in-process engine core


def _rewrite_medusa_args(engine_args: Any, spec: dict[str, Any]) -> None:
    """Validate the medusa_vllm settings and turn them into vLLM's own arguments."""
    from vllm.platforms import current_platform

    from medusa_vllm.vllm_plugin.config import (PROPOSER_CLASS, MedusaConfigError, admission_group,
                                                resolve, target_sizes)

    hidden, vocab = target_sizes(str(engine_args.model), engine_args.trust_remote_code,
                                 engine_args.revision)
    cfg = resolve(spec, str(engine_args.model), hidden, vocab)
    if cfg.runner == "v2":
        global _V2_RUNNER
        _V2_RUNNER = True
    if cfg.runner == "v2" and cfg.adaptive and not engine_args.async_scheduling:
        raise MedusaConfigError('medusa_vllm: the load-adaptive tree on the V2 runner follows vLLM\'s '
                                'asynchronous scheduler; pass --async-scheduling (async_scheduling=True)')
    if cfg.runner == "v2" and current_platform.is_cpu():
        raise MedusaConfigError('medusa_vllm: "runner": "v2" needs a GPU (vLLM\'s V2 runner prepares '
                                'inputs with Triton kernels); on the CPU use "runner": "v1"')
    engine_args.speculative_config = {
        "method": "custom_class",
        "model": PROPOSER_CLASS,
        "num_speculative_tokens": cfg.max_nodes,
    }
    cfg = dataclasses.replace(cfg, admit_group=admission_group(
        cfg.admit_group, current_platform.is_cpu(), engine_args.scheduler_cls is not None))
    if cfg.admit_group > 1 and engine_args.scheduler_cls is not None:
        raise MedusaConfigError(
            f"medusa_vllm: admit_group runs in medusa_vllm's scheduler, but --scheduler-cls "
            f"{engine_args.scheduler_cls} was given; drop one of them")
    if cfg.adaptive:
        # vLLM's dynamic speculative decoding: the scheduler sets each step's draft count from a
        # batch size table (the budget rule's), which our scheduler rewrites as it measures
        engine_args.speculative_config["num_speculative_tokens_per_batch_size"] = _adaptive_schedule(
            cfg, engine_args.max_num_seqs, "cpu" if current_platform.is_cpu() else "cuda")
        if cfg.adaptive_policy == "measured" and engine_args.scheduler_cls is not None:
            raise MedusaConfigError(
                f"medusa_vllm: the measured adaptive tree runs in medusa_vllm's scheduler, but "
                f"--scheduler-cls {engine_args.scheduler_cls} was given; drop it or pass "
                '"adaptive_policy": "budget"')
    if (cfg.adaptive or cfg.admit_group > 1) and engine_args.scheduler_cls is None:
        # the measured rule measures there (and the budget rule reports); admission groups hold there
        engine_args.scheduler_cls = (
            "medusa_vllm.vllm_plugin.scheduler."
            + ("MedusaAsyncScheduler" if engine_args.async_scheduling else "MedusaScheduler"))
    extra = dict(engine_args.additional_config or {})
    extra["medusa_vllm"] = cfg.to_dict()
    engine_args.additional_config = extra
    if engine_args.worker_cls in (None, "auto"):
        engine_args.worker_cls = (
            "medusa_vllm.vllm_plugin.worker_cpu.MedusaCPUWorker"
            if current_platform.is_cpu()
            else "medusa_vllm.vllm_plugin.worker.MedusaGPUWorker"
        )
    if not current_platform.is_cpu() and engine_args.attention_backend is None:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        engine_args.attention_backend = AttentionBackendEnum.CUSTOM


def _adaptive_schedule(cfg: Any, max_num_seqs: int | None, device: str) -> list[tuple[int, int, int]]:
    from medusa_vllm.adaptive import AdaptiveTreePolicy

    policy = AdaptiveTreePolicy(cfg.trees, True, cfg.adaptive_max_tokens, device)
    return policy.schedule(max(max_num_seqs or 0, 1024))

