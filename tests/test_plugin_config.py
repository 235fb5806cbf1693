"""The plugin's front door: vLLM's own argument machinery with medusa_vllm settings, good and bad.

No engine starts here: ``EngineArgs.create_engine_config()`` is where the plugin validates heads,
tree and options, so a bad setting must fail there with one clear line.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("vllm")

from medusa_vllm.checkpoint import save_heads  # noqa: E402
from medusa_vllm.heads import MedusaHeads, MedusaHeadsConfig  # noqa: E402


@pytest.fixture(scope="module")
def model(bundled_model_dir):
    return str(bundled_model_dir)


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    path = tmp_path_factory.mktemp("heads")
    save_heads(MedusaHeads(MedusaHeadsConfig(hidden_size=576, vocab_size=49152)), path)
    return path


def _config(model, spec, **kw):
    from vllm.engine.arg_utils import EngineArgs

    import medusa_vllm.vllm_plugin as plugin

    plugin.register()
    args = EngineArgs(model=model, max_model_len=512, speculative_config=spec, **kw)
    return args.create_engine_config()


def test_medusa_config_becomes_vllm_custom_class(model, heads):
    cfg = _config(model, {"method": "medusa_vllm", "model": str(heads), "tree": "sparse-15",
                          "acceptance": "typical"})
    spec = cfg.speculative_config
    assert spec.method == "custom_class"
    assert spec.num_speculative_tokens == 15
    ours = cfg.additional_config["medusa_vllm"]
    assert ours["acceptance"] == "typical" and len(ours["tree"]) == 15
    assert ours["heads"] == str(heads.resolve())
    from vllm.platforms import current_platform

    expected = ("medusa_vllm.vllm_plugin.worker_cpu.MedusaCPUWorker" if current_platform.is_cpu()
                else "medusa_vllm.vllm_plugin.worker.MedusaGPUWorker")
    assert cfg.parallel_config.worker_cls == expected
    # admission groups (medusa_vllm.admission): the plugin's pick, 1 on a CPU, 4 on a GPU
    assert ours["admit_group"] == (1 if current_platform.is_cpu() else 4)


def test_cli_flag_speculative_model(model, heads):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    import medusa_vllm.vllm_plugin as plugin

    plugin.register()
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    ns = parser.parse_args(["--model", model, "--speculative-model", str(heads),
                            "--speculative-config", json.dumps({"tree": "chain-3"})])
    args = AsyncEngineArgs.from_cli_args(ns)
    assert args.speculative_config["method"] == "medusa_vllm"
    assert args.speculative_config["model"] == str(heads)
    args.max_model_len = 512
    assert args.create_engine_config().speculative_config.num_speculative_tokens == 3


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"method": "medusa_vllm", "model": "/no/such/heads"}, "heads path '/no/such/heads' does not exist"),
        ({"method": "medusa_vllm", "tree": "[[0], [3, 1]]"}, "path [3, 1] has no parent"),
        ({"method": "medusa_vllm", "tree": "no-such-tree"}, "unknown token tree 'no-such-tree'"),
        ({"method": "medusa_vllm", "tree": [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0]]},
         "has depth 5, but there are only 4 Medusa heads"),
        ({"method": "medusa_vllm", "acceptance": "greedy-ish"}, "acceptance 'greedy-ish' is not one of"),
        ({"method": "medusa_vllm", "treee": "sparse-7"}, "unknown speculative config key(s) ['treee']"),
        ({"method": "medusa_vllm", "tree": "sparse-7", "num_speculative_tokens": 4},
         "num_speculative_tokens=4 but the tree has 7 nodes"),
        ({"method": "medusa_vllm", "attention": "flash"}, "attention 'flash' is not one of"),
        ({"method": "medusa_vllm", "cuda_graphs": "false"}, "cuda_graphs must be true or false"),
        ({"method": "medusa_vllm", "adaptive": True, "adaptive_policy": "fastest"},
         "adaptive_policy 'fastest' is not one of"),
        ({"method": "medusa_vllm", "runner": "v3"}, "runner 'v3' is not one of ('v1', 'v2')"),
        ({"method": "medusa_vllm", "runner": "v2", "adaptive": True},
         "the load-adaptive tree on the V2 runner follows vLLM's asynchronous scheduler; pass --async-scheduling"),
        # this machine has no GPU (the V2 runner prepares inputs with Triton kernels)
        ({"method": "medusa_vllm", "runner": "v2"}, '"runner": "v2" needs a GPU'),
    ],
)
def test_bad_settings_refuse_to_start_with_one_clear_line(model, heads, spec, message):
    spec = dict(spec)
    spec.setdefault("model", str(heads))
    with pytest.raises(ValueError) as e:
        _config(model, spec)
    text = str(e.value)
    assert message in text
    assert "\n" not in text.strip()


def test_heads_of_another_model_are_refused(model, tmp_path):
    save_heads(MedusaHeads(MedusaHeadsConfig(hidden_size=896, vocab_size=49152)), tmp_path)
    with pytest.raises(ValueError, match="hidden size 896 does not match the model's 576"):
        _config(model, {"method": "medusa_vllm", "model": str(tmp_path)})


def test_heads_with_wrong_vocab_are_refused(model, tmp_path):
    save_heads(MedusaHeads(MedusaHeadsConfig(hidden_size=576, vocab_size=32000)), tmp_path)
    with pytest.raises(ValueError, match="vocab"):
        _config(model, {"method": "medusa_vllm", "model": str(tmp_path)})


def test_nan_heads_are_refused(model, tmp_path):
    heads = MedusaHeads(MedusaHeadsConfig(hidden_size=576, vocab_size=49152))
    with torch.no_grad():
        heads.blocks[1][0].linear.weight[3, 4] = float("nan")
    save_heads(heads, tmp_path)
    with pytest.raises(ValueError, match="NaN"):
        _config(model, {"method": "medusa_vllm", "model": str(tmp_path)})


def test_no_heads_for_an_unknown_model(tmp_path, model):
    # a model folder with no heads next to it, and not the bundled one
    import shutil

    other = tmp_path / "other-model"
    shutil.copytree(model, other)
    with pytest.raises(ValueError, match="no Medusa heads for model"):
        _config(str(other), {"method": "medusa_vllm"})


def _engine_config(eager: bool):
    from types import SimpleNamespace

    return SimpleNamespace(model_config=SimpleNamespace(enforce_eager=eager))


@pytest.mark.parametrize(
    "choice,eager,device,message",
    [
        ("reference", False, "cpu", "attention 'reference' syncs the host in every layer"),
        ("xformers", False, "cuda", "pass enforce_eager=True (--enforce-eager) with it"),
        ("xformers", True, "cpu", "attention 'xformers' runs xformers' Triton kernels, GPU only"),
    ],
)
def test_attention_backends_that_cannot_run_refuse_to_start(choice, eager, device, message):
    from medusa_vllm.vllm_plugin.config import MedusaConfigError
    from medusa_vllm.vllm_plugin.runner import _attention_backend

    with pytest.raises(MedusaConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _attention_backend(choice, _engine_config(eager), torch.device(device))


def test_attention_backend_choices():
    from medusa_vllm import kernels
    from medusa_vllm.vllm_plugin.runner import _attention_backend

    cpu = torch.device("cpu")
    assert _attention_backend("auto", _engine_config(False), cpu) == "kernel"
    assert _attention_backend("reference", _engine_config(True), cpu) == "reference"
    if kernels.have_extension():
        assert _attention_backend("kernel", _engine_config(False), cpu) == "kernel"


def test_measured_adaptive_tree_refuses_a_foreign_scheduler_class(model, heads):
    spec = {"method": "medusa_vllm", "model": str(heads), "adaptive": True}
    with pytest.raises(ValueError, match=r"runs in medusa_vllm's scheduler, but --scheduler-cls "
                                         r"my\.Scheduler was given; drop it or pass"):
        _config(model, spec, scheduler_cls="my.Scheduler")


@pytest.mark.parametrize("name, value, message", [
    ("MEDUSA_VLLM_KV_MOVE", "grpah", "MEDUSA_VLLM_KV_MOVE='grpah': use 'graph'"),
    ("MEDUSA_VLLM_SAMPLED_GRAPH_ROWS", "4k", "MEDUSA_VLLM_SAMPLED_GRAPH_ROWS='4k': use a whole number"),
])
def test_bad_runner_setting_is_a_clear_error(name, value, message):
    import subprocess
    import sys

    env = dict(os.environ, **{name: value})
    res = subprocess.run([sys.executable, "-c", "import medusa_vllm.vllm_plugin.runner"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr[-2000:]


def test_the_config_picks_the_runner(model, heads):
    """Which vLLM runner a config gets: vLLM's choice (V1) for "runner": "v1", V2 for "v2" —
    asked of the same VllmConfig property every vLLM process (scheduler, worker) reads — and a
    medusa_vllm V2 config is not in V2's list of unsupported features."""
    cfg = _config(model, {"method": "medusa_vllm", "model": str(heads), "tree": "sparse-15"})
    assert cfg.use_v2_model_runner is False
    cfg.additional_config["medusa_vllm"]["runner"] = "v2"
    assert cfg.use_v2_model_runner is True
    assert "speculative method 'custom_class'" not in cfg._get_v2_model_runner_unsupported_features()
    cfg.additional_config["medusa_vllm"]["runner"] = "v1"
    assert "speculative method 'custom_class'" in cfg._get_v2_model_runner_unsupported_features()


def test_plugin_info_lines_print_like_vllms():
    """medusa_vllm's loggers sit outside vLLM's "vllm" logger: after register() their INFO
    lines print through vLLM's handler (before, only warnings reached stderr)."""
    import subprocess
    import sys

    code = ("from medusa_vllm.vllm_plugin import register; register();"
            "from vllm.logger import init_logger;"
            "init_logger('medusa_vllm.vllm_plugin.graphs').info('medusa_vllm: hello %d', 7)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in (out.stdout + out.stderr).splitlines() if "medusa_vllm: hello 7" in line]
    assert len(lines) == 1 and "INFO" in lines[0], (out.stdout + out.stderr)[-2000:]
