import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from medusa_vllm.checkpoint import (
    LAYOUTS,
    CheckpointError,
    convert_heads,
    load_heads,
    load_lm_head_weight,
    main,
    save_heads,
)
from medusa_vllm.heads import MedusaHeads, MedusaHeadsConfig

H, V, K, L = 32, 100, 3, 2
WEIGHTS = {"medusa_vllm": "medusa_heads.safetensors", "fasterdecoding": "medusa_lm_head.safetensors",
           "vllm": "model.safetensors"}


def _heads(own=False, bias=True, **extra) -> MedusaHeads:
    cfg = MedusaHeadsConfig(H, V, num_heads=K, num_layers=L, own_lm_heads=own, bias=bias,
                            base_model="base/x", tree=[[0], [1], [0, 0], [0, 0, 0]],
                            head_accuracies=[[0.5, 0.6], [0.3, 0.4], [0.2, 0.3]], **extra)
    heads = MedusaHeads(cfg)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 0.1)
    return heads


@pytest.fixture
def lm_head():
    return torch.randn(V, H)


def _same_heads(a: MedusaHeads, b: MedusaHeads, lm_head: torch.Tensor) -> None:
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    x = torch.randn(4, H)
    torch.testing.assert_close(a.logits(x, lm_head), b.logits(x, lm_head), rtol=0, atol=0)


def _one_line_error(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


@pytest.mark.parametrize("own", [False, True], ids=["shared", "own"])
@pytest.mark.parametrize("src", LAYOUTS)
@pytest.mark.parametrize("dst", LAYOUTS)
def test_round_trip_across_layouts(tmp_path, lm_head, src, dst, own):
    heads = _heads(own=own)
    save_heads(heads, tmp_path / "a", src, lm_head_weight=lm_head, dtype=torch.float32)
    convert_heads(tmp_path / "a", tmp_path / "b", dst, lm_head_weight=lm_head)
    loaded = load_heads(tmp_path / "b", hidden_size=H, vocab_size=V)
    _same_heads(heads, loaded, lm_head)
    assert loaded.config.own_lm_heads == own  # our metadata survives the foreign config.json
    # detection by weights file as well as by folder
    _same_heads(heads, load_heads(tmp_path / "b" / WEIGHTS[dst]), lm_head)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stored_keys_and_config(tmp_path, lm_head, layout):
    """The exact names each layout's readers expect (round trips alone would not catch a rename)."""
    save_heads(_heads(own=False), tmp_path, layout, lm_head_weight=lm_head)
    keys = set(load_file(tmp_path / WEIGHTS[layout]))
    blocks = {
        "medusa_vllm": "blocks.{h}.{l}.linear.{p}", "fasterdecoding": "{h}.{l}.linear.{p}",
        "vllm": "blocks.{h}.layers.{l}.{p}",
    }[layout]
    expected = {blocks.format(h=h, l=l, p=p) for h in range(K) for l in range(L) for p in ("weight", "bias")}
    expected |= {"medusa_vllm": set(), "fasterdecoding": {f"{h}.{L}.weight" for h in range(K)},
                 "vllm": {"lm_head.weight"}}[layout]
    assert keys == expected
    if layout == "medusa_vllm":
        cfg = json.loads((tmp_path / "medusa_config.json").read_text())
        assert cfg["format"] == "medusa_vllm" and cfg["version"] == 1 and cfg["tree"][3] == [0, 0, 0]
    elif layout == "fasterdecoding":
        cfg = json.loads((tmp_path / "config.json").read_text())
        assert (cfg["medusa_num_heads"], cfg["medusa_num_layers"], cfg["hidden_size"], cfg["vocab_size"],
                cfg["base_model_name_or_path"]) == (K, L, H, V, "base/x")
    else:
        cfg = json.loads((tmp_path / "config.json").read_text())
        assert cfg["architectures"] == ["MedusaModel"] and cfg["model_type"] == "medusa"
        sizes = (cfg["num_heads"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"])
        assert sizes == (K, L, H, V)
        assert cfg["medusa_fc_bias"] is True and cfg["original_lm_head"] is True
        assert not [k for k in cfg if "num" in k and "heads" in k and k != "num_heads"]


def test_default_dtype_is_bf16_and_load_dtype(tmp_path):
    save_heads(_heads(own=True), tmp_path)
    assert {t.dtype for t in load_file(tmp_path / "medusa_heads.safetensors").values()} == {torch.bfloat16}
    assert {p.dtype for p in load_heads(tmp_path).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_heads(tmp_path, dtype=torch.float32).parameters()} == {torch.float32}


def _foreign_fasterdecoding(directory: Path, heads: MedusaHeads, with_projection=True) -> None:
    """A checkpoint as FasterDecoding/Medusa writes it: no hidden/vocab sizes, no metadata of ours."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(
        {"medusa_num_heads": K, "medusa_num_layers": L, "base_model_name_or_path": "lmsys/vicuna-7b-v1.3"}))
    sd = {f"{h}.{l}.linear.{p}": heads.blocks[h][l].linear.state_dict()[p]
          for h in range(K) for l in range(L) for p in ("weight", "bias")}
    if with_projection:
        sd.update({f"{h}.{L}.weight": heads.lm_heads[h].weight.detach() for h in range(K)})
    save_file({k: v.contiguous() for k, v in sd.items()}, directory / "medusa_lm_head.safetensors")


def test_foreign_fasterdecoding_checkpoint(tmp_path, lm_head):
    heads = _heads(own=True)
    _foreign_fasterdecoding(tmp_path / "fd", heads)
    loaded = load_heads(tmp_path / "fd", hidden_size=H, vocab_size=V)
    assert loaded.config.own_lm_heads and loaded.config.bias and loaded.config.tree is None
    assert (loaded.config.hidden_size, loaded.config.vocab_size) == (H, V)  # inferred from tensors
    x = torch.randn(4, H)
    torch.testing.assert_close(loaded.logits(x), heads.logits(x))
    # Medusa-2 legacy: no per-head projection, the heads use the base lm_head
    _foreign_fasterdecoding(tmp_path / "legacy", heads, with_projection=False)
    legacy = load_heads(tmp_path / "legacy", hidden_size=H, vocab_size=V)
    assert not legacy.config.own_lm_heads
    heads_shared = MedusaHeads(MedusaHeadsConfig(H, V, num_heads=K, num_layers=L))
    heads_shared.blocks.load_state_dict(heads.blocks.state_dict())
    torch.testing.assert_close(legacy.logits(x, lm_head), heads_shared.logits(x, lm_head))


def test_foreign_vllm_original_lm_head_loads_as_shared_storage(tmp_path, lm_head):
    heads = _heads(own=False)
    save_heads(heads, tmp_path, "vllm", lm_head_weight=lm_head, dtype=torch.float32)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["medusa_vllm"]  # as if written by another tool
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_heads(tmp_path)
    assert loaded.config.own_lm_heads
    assert len({lm.weight.data_ptr() for lm in loaded.lm_heads}) == 1  # one tensor, K heads
    x = torch.randn(4, H)
    torch.testing.assert_close(loaded.logits(x), heads.logits(x, lm_head))
    convert_heads(tmp_path, tmp_path / "ours", "medusa_vllm")  # shared storage saves fine
    torch.testing.assert_close(load_heads(tmp_path / "ours").logits(x), heads.logits(x, lm_head))


def test_vllm_layout_without_bias(tmp_path, lm_head):
    heads = _heads(own=True, bias=False)
    save_heads(heads, tmp_path, "vllm", dtype=torch.float32)
    assert json.loads((tmp_path / "config.json").read_text())["medusa_fc_bias"] is False
    _same_heads(heads, load_heads(tmp_path), lm_head)


def test_vllm_biases_without_medusa_fc_bias_are_refused(tmp_path, lm_head):
    save_heads(_heads(), tmp_path, "vllm", lm_head_weight=lm_head)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["medusa_fc_bias"] = False  # vLLM's default: it would silently drop the biases
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_heads(tmp_path)
    _one_line_error(e, "model.safetensors", "unexpected tensors blocks.0.layers.0.bias", "medusa_fc_bias")


def test_save_argument_errors(tmp_path, lm_head):
    with pytest.raises(ValueError, match="pass lm_head_weight"):
        save_heads(_heads(), tmp_path / "fd", "fasterdecoding")
    with pytest.raises(ValueError, match="lm_head_weight has shape"):
        save_heads(_heads(), tmp_path / "v", "vllm", lm_head_weight=lm_head.T)
    with pytest.raises(ValueError, match="layout"):
        save_heads(_heads(), tmp_path / "x", "medusa")
    save_heads(_heads(), tmp_path / "mixed", "vllm", lm_head_weight=lm_head)
    with pytest.raises(ValueError, match="already holds heads in the 'vllm' layout"):
        save_heads(_heads(), tmp_path / "mixed", "fasterdecoding", lm_head_weight=lm_head)


# ---------------------------------------------------------------------------------------------
# damaged and mismatched checkpoints: CheckpointError naming the file and the mismatch
# ---------------------------------------------------------------------------------------------
def _edit_tensors(file: Path, edit) -> None:
    sd = load_file(file)
    edit(sd)
    save_file(sd, file)


@pytest.fixture(params=LAYOUTS)
def saved(request, tmp_path, lm_head):
    """(folder, weights file, layout) of shared-lm_head heads saved in each layout."""
    layout = request.param
    save_heads(_heads(), tmp_path / "heads", layout, lm_head_weight=lm_head)
    return tmp_path / "heads", tmp_path / "heads" / WEIGHTS[layout], layout


def test_truncated_file(saved):
    folder, file, _ = saved
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_heads(folder)
    _one_line_error(e, str(file), "truncated or corrupt")


def test_nan_weights(saved):
    folder, file, layout = saved
    key = {"medusa_vllm": "blocks.1.0.linear.weight", "fasterdecoding": "1.0.linear.weight",
           "vllm": "blocks.1.layers.0.weight"}[layout]

    def poison(sd):
        sd[key][3, 5] = float("nan")
    _edit_tensors(file, poison)
    with pytest.raises(CheckpointError) as e:
        load_heads(folder)
    _one_line_error(e, str(file), f"tensor {key} holds NaN or Inf")


def test_inf_in_lm_head(tmp_path):
    save_heads(_heads(own=True), tmp_path)
    _edit_tensors(tmp_path / "medusa_heads.safetensors",
                  lambda sd: sd["lm_heads.2.weight"].__setitem__((0, 0), float("inf")))
    with pytest.raises(CheckpointError) as e:
        load_heads(tmp_path)
    _one_line_error(e, "lm_heads.2.weight holds NaN or Inf")


def test_wrong_hidden_size(saved):
    folder, file, _ = saved
    with pytest.raises(CheckpointError) as e:
        load_heads(folder, hidden_size=576, vocab_size=V)
    _one_line_error(e, str(file), f"hidden size {H} does not match the model's 576", "train heads")


def test_wrong_vocab_size(saved):
    folder, file, _ = saved
    with pytest.raises(CheckpointError) as e:
        load_heads(folder, hidden_size=H, vocab_size=49152)
    _one_line_error(e, str(file), f"vocab size {V} does not match the model's 49152")


def test_missing_tensor(saved):
    folder, file, layout = saved
    key = {"medusa_vllm": "blocks.2.1.linear.bias", "fasterdecoding": "2.1.linear.bias",
           "vllm": "blocks.2.layers.1.bias"}[layout]
    _edit_tensors(file, lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError) as e:
        load_heads(folder)
    _one_line_error(e, str(file), f"missing tensors {key}")


def test_unexpected_tensor(saved):
    folder, file, layout = saved
    key = {"medusa_vllm": "blocks.3.0.linear.weight", "fasterdecoding": "3.0.linear.weight",
           "vllm": "blocks.3.layers.0.weight"}[layout]  # a 4th head the config does not declare
    _edit_tensors(file, lambda sd: sd.__setitem__(key, torch.zeros(H, H, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError) as e:
        load_heads(folder)
    _one_line_error(e, str(file), f"unexpected tensors {key}")


def test_wrong_shape(tmp_path):
    save_heads(_heads(), tmp_path)
    _edit_tensors(tmp_path / "medusa_heads.safetensors",
                  lambda sd: sd.__setitem__("blocks.0.1.linear.weight", torch.zeros(H, H + 1)))
    with pytest.raises(CheckpointError) as e:
        load_heads(tmp_path)
    _one_line_error(e, f"blocks.0.1.linear.weight has shape [{H}, {H + 1}], expected [{H}, {H}]")


def test_pickled_file_is_refused_without_unpickling(tmp_path):
    folder = tmp_path / "fd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"medusa_num_heads": K, "medusa_num_layers": L}))
    marker = tmp_path / "unpickled"
    torch.save({"0.0.linear.weight": torch.zeros(H, H), "evil": _Boom(str(marker))},
               folder / "medusa_lm_head.pt")
    for path in (folder, folder / "medusa_lm_head.pt"):
        with pytest.raises(CheckpointError) as e:
            load_heads(path)
        msg = str(e.value)
        assert f"{folder / 'medusa_lm_head.pt'}: is a pickled torch file" in msg.splitlines()[0]
        assert "weights_only=True" in msg and "save_file(" in msg and len(msg.splitlines()) == 4
    assert not marker.exists()


class _Boom:
    """Unpickling this touches a file: proof that nothing was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("case", ["missing", "empty", "base_model", "no_config"])
def test_nothing_to_load(tmp_path, case):
    target = tmp_path / "heads"
    if case != "missing":
        target.mkdir()
    if case == "base_model":
        (target / "config.json").write_text(json.dumps({"model_type": "llama"}))
        save_file({"model.embed_tokens.weight": torch.zeros(V, H)}, target / "model.safetensors")
    if case == "no_config":
        save_heads(_heads(), target)
        (target / "medusa_config.json").unlink()
    with pytest.raises(CheckpointError) as e:
        load_heads(target)
    expected = {"missing": "does not exist", "empty": "no Medusa heads found",
                "base_model": "no Medusa heads found", "no_config": "medusa_config.json: is missing"}[case]
    _one_line_error(e, str(target), expected)


def test_bad_config_json(tmp_path):
    save_heads(_heads(), tmp_path)
    (tmp_path / "medusa_config.json").write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        load_heads(tmp_path)
    _one_line_error(e, "medusa_config.json", "not valid JSON")
    cfg = {**_heads().config.to_dict(), "format": "medusa_vllm", "version": 1, "num_heads": 0}
    (tmp_path / "medusa_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_heads(tmp_path)
    _one_line_error(e, "medusa_config.json", "num_heads must be a positive int")


# ---------------------------------------------------------------------------------------------
# the base model's lm_head and the CLI
# ---------------------------------------------------------------------------------------------
def _base_model(folder: Path, lm_head: torch.Tensor, tied: bool) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": tied}))
    sd = {"model.embed_tokens.weight": lm_head if tied else torch.zeros(V, H),
          "model.norm.weight": torch.ones(H)}
    if not tied:
        sd["lm_head.weight"] = lm_head
    save_file(sd, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("tied", [True, False])
def test_load_lm_head_weight(tmp_path, lm_head, tied):
    folder = _base_model(tmp_path / "base", lm_head, tied)
    torch.testing.assert_close(load_lm_head_weight(folder), lm_head, rtol=0, atol=0)


def test_load_lm_head_weight_untied_without_lm_head(tmp_path, lm_head):
    folder = _base_model(tmp_path / "base", lm_head, tied=False)
    save_file({"model.embed_tokens.weight": lm_head}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="no tensor named lm_head.weight"):
        load_lm_head_weight(folder)


def test_cli_convert(tmp_path, lm_head, capsys):
    heads = _heads()
    save_heads(heads, tmp_path / "ours", dtype=torch.float32)
    base = _base_model(tmp_path / "base", lm_head, tied=True)
    with pytest.raises(SystemExit) as e:  # shared heads need the base model's lm_head
        main(["convert", str(tmp_path / "ours"), str(tmp_path / "v"), "--layout", "vllm"])
    assert e.value.code == 2 and "pass lm_head_weight" in capsys.readouterr().err
    main(["convert", str(tmp_path / "ours"), str(tmp_path / "v"), "--layout", "vllm",
          "--base-model", str(base)])
    assert capsys.readouterr().out.strip() == str(tmp_path / "v" / "model.safetensors")
    _same_heads(heads, load_heads(tmp_path / "v"), lm_head)
    main(["info", str(tmp_path / "v")])
    assert json.loads(capsys.readouterr().out)["num_heads"] == K


# ---------------------------------------------------------------------------------------------
# vLLM reads the "vllm" layout (skipped where vLLM does not import)
# ---------------------------------------------------------------------------------------------
def test_vllm_config_machinery_accepts_vllm_layout(tmp_path, lm_head):
    configs = pytest.importorskip("vllm.transformers_utils.configs.medusa", exc_type=ImportError)
    save_heads(_heads(), tmp_path, "vllm", lm_head_weight=lm_head)
    cfg = configs.MedusaConfig.from_pretrained(str(tmp_path))
    assert (cfg.num_heads, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (K, L, H, V)
    assert cfg.medusa_fc_bias is True and cfg.original_lm_head is True
    assert cfg.truncated_vocab_size == V and cfg.architectures == ["MedusaModel"]


_VLLM_SCRIPT = r"""
import json, sys, torch
from types import SimpleNamespace
from safetensors.torch import load_file
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.distributed import init_distributed_environment, initialize_model_parallel
from vllm.model_executor.models.medusa import Medusa
from vllm.transformers_utils.configs.medusa import MedusaConfig

x = torch.load(sys.argv[1])  # written by the test itself (tensors only)
out = {}
with set_current_vllm_config(VllmConfig()):
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method="file://" + sys.argv[1] + ".dist")
    initialize_model_parallel(1, 1)
    for folder in sys.argv[2:]:
        hf = MedusaConfig.from_pretrained(folder)
        model = Medusa(vllm_config=SimpleNamespace(
            speculative_config=SimpleNamespace(draft_model_config=SimpleNamespace(hf_config=hf))))
        loaded = model.load_weights(load_file(folder + "/model.safetensors").items())
        for module in model.modules():  # what vLLM's loader does after load_weights (CPU gemm)
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(module)
        logits = torch.stack(model.compute_logits(model(x)), dim=1)  # [N, K, V]
        missing = sorted({n for n, _ in model.named_parameters()} - loaded)
        torch.save(logits, folder + "/vllm_logits.pt")
        out[folder] = missing
print("RESULT " + json.dumps(out))
"""


def test_vllm_medusa_model_loads_vllm_layout(tmp_path, lm_head):
    """vLLM's own Medusa module loads every weight of our "vllm" layout and computes our logits."""
    pytest.importorskip("vllm.model_executor.models.medusa", exc_type=ImportError)
    x = torch.randn(5, H)
    torch.save(x, tmp_path / "x.pt")
    cases = {"shared": _heads(own=False), "own": _heads(own=True), "no_bias": _heads(own=True, bias=False)}
    for name, heads in cases.items():
        save_heads(heads, tmp_path / name, "vllm", lm_head_weight=lm_head, dtype=torch.float32)
    proc = subprocess.run([sys.executable, "-c", _VLLM_SCRIPT, str(tmp_path / "x.pt"),
                           *(str(tmp_path / n) for n in cases)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and result, proc.stderr[-3000:]
    missing = json.loads(result[0].removeprefix("RESULT "))
    for name, heads in cases.items():
        assert missing[str(tmp_path / name)] == [], name  # no parameter left at its random init
        vllm_logits = torch.load(tmp_path / name / "vllm_logits.pt")
        torch.testing.assert_close(vllm_logits, heads.logits(x, lm_head), rtol=1e-4, atol=1e-4)
