"""Save and load Medusa heads in three on-disk layouts; safetensors only, never unpickle.

Tensor keys use h = head, l = layer, L = num_layers.
- "medusa_vllm" (ours): `medusa_config.json` (every MedusaHeadsConfig field, "format", "version")
  and `medusa_heads.safetensors`: `blocks.{h}.{l}.linear.weight|bias`, `lm_heads.{h}.weight`
  (own_lm_heads only).
- "fasterdecoding" (FasterDecoding/Medusa): `config.json` (`medusa_num_heads`,
  `medusa_num_layers`, `base_model_name_or_path`, `hidden_size`, `vocab_size`) and
  `medusa_lm_head.safetensors`: `{h}.{l}.linear.weight|bias`, `{h}.{L}.weight` (vocab projection).
- "vllm" (vLLM 0.26 `MedusaModel`): `config.json` (`architectures: [MedusaModel]`,
  `model_type: medusa`, `hidden_size`, `vocab_size`, `num_heads`, `num_hidden_layers`,
  `medusa_fc_bias`, `original_lm_head`) and `model.safetensors`: `blocks.{h}.layers.{l}.weight|bias`
  and either `lm_heads.{h}.weight` or one `lm_head.weight` (with `original_lm_head: true`).

Heads that share the base lm_head (own_lm_heads=False) have no vocab projection of their own; the
two foreign layouts need one, so saving them there takes `lm_head_weight` and writes it
(FasterDecoding: a copy per head; vLLM: once, as `lm_head.weight` with `original_lm_head: true`,
which vLLM's `Medusa` module shares across heads). The foreign config.json files also carry our
full config under the key `"medusa_vllm"`, so a round trip keeps own_lm_heads=False, the tree and
the head accuracies; without that key (a checkpoint from elsewhere) the vocab projections load as
own lm heads (own_lm_heads=True), which is simple and gives the same logits.

Every problem found while loading raises `CheckpointError` (a ValueError) with a one-line message
that names the file, the mismatch and what to do.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medusa_vllm.heads import MedusaHeads, MedusaHeadsConfig

LAYOUTS = ("medusa_vllm", "fasterdecoding", "vllm")
FORMAT_VERSION = 1
OURS_CONFIG, OURS_WEIGHTS = "medusa_config.json", "medusa_heads.safetensors"
FD_WEIGHTS, HF_CONFIG, VLLM_WEIGHTS = "medusa_lm_head.safetensors", "config.json", "model.safetensors"
META_KEY = "medusa_vllm"  # our full config, stored inside the foreign layouts' config.json
PICKLE_SUFFIXES = (".pt", ".bin", ".pth")
_WEIGHT_FILES = {"medusa_vllm": OURS_WEIGHTS, "fasterdecoding": FD_WEIGHTS, "vllm": VLLM_WEIGHTS}
_CONFIG_FILES = {"medusa_vllm": OURS_CONFIG, "fasterdecoding": HF_CONFIG, "vllm": HF_CONFIG}
_RETRAIN = "train heads for this model (python -m training.train) or pass the heads that belong to it"
_RESAVE = "re-save the heads (medusa_vllm.checkpoint.save_heads) or copy the checkpoint again"


class CheckpointError(ValueError):
    """A Medusa heads checkpoint is missing, damaged, or does not fit the model."""


def _fail(file: Path | str, problem: str, todo: str = _RESAVE) -> CheckpointError:
    return CheckpointError(f"medusa heads {file}: {problem}; {todo}")


# ---------------------------------------------------------------------------------------------
# key mapping between our state-dict names and the two foreign layouts
# ---------------------------------------------------------------------------------------------
_OURS_BLOCK = re.compile(r"blocks\.(\d+)\.(\d+)\.linear\.(weight|bias)")
_OURS_LM = re.compile(r"lm_heads\.(\d+)\.weight")
_FD_BLOCK = re.compile(r"(\d+)\.(\d+)\.linear\.(weight|bias)")
_FD_LM = re.compile(r"(\d+)\.(\d+)\.weight")
_VLLM_BLOCK = re.compile(r"blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)")


def _from_ours(key: str, layout: str, num_layers: int) -> str:
    """Our state-dict key -> the key `layout` stores it under (other keys unchanged)."""
    if layout == "medusa_vllm":
        return key
    if m := _OURS_BLOCK.fullmatch(key):
        h, l, p = m.groups()
        return f"{h}.{l}.linear.{p}" if layout == "fasterdecoding" else f"blocks.{h}.layers.{l}.{p}"
    if (m := _OURS_LM.fullmatch(key)) and layout == "fasterdecoding":
        return f"{m.group(1)}.{num_layers}.weight"
    return key


def _to_ours(key: str, layout: str, num_layers: int) -> str | None:
    """A stored key -> our state-dict key; None when the key has no place in MedusaHeads."""
    if layout == "medusa_vllm":
        return key
    if layout == "fasterdecoding":
        if m := _FD_BLOCK.fullmatch(key):
            return "blocks.{}.{}.linear.{}".format(*m.groups())
        if (m := _FD_LM.fullmatch(key)) and int(m.group(2)) == num_layers:
            return f"lm_heads.{m.group(1)}.weight"
        return None
    key = key.removeprefix("medusa_heads.")  # vLLM strips this prefix (ModelOpt checkpoints)
    if m := _VLLM_BLOCK.fullmatch(key):
        return "blocks.{}.{}.linear.{}".format(*m.groups())
    return key if _OURS_LM.fullmatch(key) else None


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------
def save_heads(heads: MedusaHeads, directory: str | Path, layout: str = "medusa_vllm", *,
               lm_head_weight: Tensor | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `heads` into `directory` in `layout`; returns the weights file.

    lm_head_weight [V, H] (the base model's lm_head) is required to write heads that share it
    (own_lm_heads=False) in the "fasterdecoding" and "vllm" layouts, and ignored otherwise.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"save_heads: layout {layout!r} is not one of {LAYOUTS}")
    cfg = heads.config
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    others = [name for name in _existing_layouts(directory) if name != layout]
    if others:
        raise ValueError(f"save_heads: {directory} already holds heads in the {others[0]!r} layout; "
                         "write each layout into its own folder")
    shared = not cfg.own_lm_heads and layout != "medusa_vllm"
    if shared:
        heads._check_lm_head_weight(_require_lm_head(lm_head_weight, layout))
    tensors = {_from_ours(k, layout, cfg.num_layers): v for k, v in heads.state_dict().items()}
    if shared and layout == "fasterdecoding":  # the layout has no shared head: one copy per head
        tensors.update({f"{h}.{cfg.num_layers}.weight": lm_head_weight for h in range(cfg.num_heads)})
    elif shared:  # vLLM: one lm_head, shared by all heads through `original_lm_head`
        tensors["lm_head.weight"] = lm_head_weight
    _save_tensors(tensors, directory / _WEIGHT_FILES[layout], dtype)
    config = _config_json(cfg, layout, original_lm_head=shared)
    (directory / _CONFIG_FILES[layout]).write_text(json.dumps(config, indent=2) + "\n")
    return directory / _WEIGHT_FILES[layout]


def _require_lm_head(lm_head_weight: Tensor | None, layout: str) -> Tensor:
    if lm_head_weight is None:
        raise ValueError(
            f"save_heads: these heads share the base lm_head (own_lm_heads=False) and the {layout!r} "
            "layout stores a vocab projection; pass lm_head_weight (load_lm_head_weight(base_model_dir))")
    return lm_head_weight


def _save_tensors(tensors: dict[str, Tensor], file: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    out, seen = {}, set()
    for key, tensor in tensors.items():
        t = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()  # safetensors refuses tensors that share memory (e.g. one lm_head, K heads)
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    save_file(out, str(file), metadata={"format": "pt"})


def _config_json(cfg: MedusaHeadsConfig, layout: str, original_lm_head: bool) -> dict[str, Any]:
    if layout == "medusa_vllm":
        return {"format": "medusa_vllm", "version": FORMAT_VERSION, **cfg.to_dict()}
    meta = {"format": "medusa_vllm", "version": FORMAT_VERSION, **cfg.to_dict()}
    if layout == "fasterdecoding":
        return {"medusa_num_heads": cfg.num_heads, "medusa_num_layers": cfg.num_layers,
                "base_model_name_or_path": cfg.base_model, "hidden_size": cfg.hidden_size,
                "vocab_size": cfg.vocab_size, META_KEY: meta}
    # vLLM: MedusaConfig renames every top-level key holding "num" and "heads" to num_heads, so
    # no other key may contain both; medusa_fc_bias defaults to False there (biases dropped).
    return {"architectures": ["MedusaModel"], "model_type": "medusa",
            "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
            "num_heads": cfg.num_heads, "num_hidden_layers": cfg.num_layers,
            "medusa_fc_bias": cfg.bias, "original_lm_head": original_lm_head, META_KEY: meta}


def _existing_layouts(directory: Path) -> list[str]:
    found = []
    if (directory / OURS_CONFIG).exists() or (directory / OURS_WEIGHTS).exists():
        found.append("medusa_vllm")
    if (directory / FD_WEIGHTS).exists():
        found.append("fasterdecoding")
    elif _is_vllm_config(directory / HF_CONFIG):
        found.append("vllm")
    return found


def _is_vllm_config(file: Path) -> bool:
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError):
        return False
    return cfg.get("model_type") == "medusa" or "MedusaModel" in (cfg.get("architectures") or [])


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
@dataclass
class _Found:
    layout: str
    weights: Path  # the safetensors file
    config: Path | None  # the JSON config next to it (None: absent, FasterDecoding only)


def load_heads(path: str | Path, *, hidden_size: int | None = None, vocab_size: int | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> MedusaHeads:
    """Load heads from a folder (or one of its weight files) in any of the three layouts.

    hidden_size / vocab_size: the base model's, checked against the checkpoint when given.
    dtype None keeps the stored dtype. Raises CheckpointError on any problem.
    """
    found = _find(Path(path))
    if found.config is None and found.layout == "medusa_vllm":
        raise _fail(found.weights.parent / OURS_CONFIG, f"is missing next to {OURS_WEIGHTS}")
    raw_cfg = _read_json(found.config) if found.config is not None else {}
    tensors = _read_tensors(found.weights, device)
    cfg, sd = _interpret(found, raw_cfg, tensors, hidden_size, vocab_size)
    _check_size(found.weights, "hidden size", cfg.hidden_size, hidden_size)
    _check_size(found.weights, "vocab size", cfg.vocab_size, vocab_size)
    _check_tensors(found, cfg, sd)
    with torch.device("meta"):
        heads = MedusaHeads(cfg)
    heads.load_state_dict(sd, assign=True)
    return heads.to(dtype=dtype) if dtype is not None else heads


def load_heads_config(path: str | Path, *, hidden_size: int | None = None,
                      vocab_size: int | None = None) -> MedusaHeadsConfig:
    """The config of a heads checkpoint, after the same checks as :func:`load_heads` (weights are
    read too: shapes, NaN/Inf). Used to refuse a bad checkpoint before an engine starts."""
    return load_heads(path, hidden_size=hidden_size, vocab_size=vocab_size).config


def _find(path: Path) -> _Found:
    if not path.exists():
        raise _fail(path, "does not exist",
                    "pass the folder written by save_heads or by training (python -m training.train)")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise _pickled(path)
        return _found_for_file(path)
    for layout in _existing_layouts(path):
        weights = path / _WEIGHT_FILES[layout]
        if not weights.exists():
            _refuse_pickled_siblings(path, layout)
            raise _fail(weights, "is missing next to " + _CONFIG_FILES[layout])
        config = path / _CONFIG_FILES[layout]
        return _Found(layout, weights, config if config.exists() else None)
    _refuse_pickled_siblings(path, None)
    raise _fail(path, f"no Medusa heads found (expected {OURS_CONFIG} + {OURS_WEIGHTS}, {FD_WEIGHTS}, "
                f"or a vLLM MedusaModel {HF_CONFIG} + {VLLM_WEIGHTS})",
                "pass the folder written by save_heads or by training (python -m training.train)")


def _found_for_file(file: Path) -> _Found:
    layouts = _existing_layouts(file.parent)
    for layout in layouts:
        if file.name == _WEIGHT_FILES[layout] or (layout == "vllm" and file.suffix == ".safetensors"):
            config = file.parent / _CONFIG_FILES[layout]
            return _Found(layout, file, config if config.exists() else None)
    raise _fail(file, "is not a Medusa heads weight file (expected "
                f"{OURS_WEIGHTS}, {FD_WEIGHTS} or {VLLM_WEIGHTS} next to its config)",
                "pass the heads folder instead")


def _refuse_pickled_siblings(directory: Path, layout: str | None) -> None:
    names = [_WEIGHT_FILES[layout]] if layout else list(_WEIGHT_FILES.values())
    stems = [Path(name).stem for name in names] + ["pytorch_model"]
    for stem in stems:
        for suffix in PICKLE_SUFFIXES:
            if (directory / (stem + suffix)).exists():
                raise _pickled(directory / (stem + suffix))


def _pickled(file: Path) -> CheckpointError:
    target = file.with_name({"pytorch_model": "model"}.get(file.stem, file.stem) + ".safetensors")
    return CheckpointError(
        f"medusa heads {file}: is a pickled torch file; medusa_vllm loads only safetensors (unpickling "
        f"can run arbitrary code); if you trust the file, convert it once with:\n"
        f"    import torch; from safetensors.torch import save_file\n"
        f"    sd = torch.load({str(file)!r}, map_location='cpu', weights_only=True)\n"
        f"    save_file({{k: v.contiguous() for k, v in sd.items()}}, {str(target)!r})")


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _fail(file, f"is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise _fail(file, "must hold a JSON object")
    return data


def _read_tensors(file: Path, device: str | torch.device) -> dict[str, Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # SafetensorError (truncated/corrupt) is not exported as a class
        if "SafetensorError" not in type(e).__name__ and not isinstance(e, (OSError, ValueError)):
            raise
        raise _fail(file, f"is truncated or corrupt ({e})") from None


def _interpret(found: _Found, raw: dict[str, Any], tensors: dict[str, Tensor],
               hidden_size: int | None, vocab_size: int | None
               ) -> tuple[MedusaHeadsConfig, dict[str, Tensor]]:
    """Stored config + tensors -> (our config, tensors under our keys; foreign keys left as is).

    Sizes missing from a foreign config come from the tensors, else from the caller's model.
    """
    if found.layout == "medusa_vllm":
        return _ours_config(found.config or found.weights, raw), tensors
    meta = raw.get(META_KEY)
    n_heads = _first_int(raw, "num_heads", "medusa_num_heads")
    n_layers = _first_int(raw, "num_hidden_layers", "medusa_num_layers")
    if n_heads is None or n_layers is None:  # FasterDecoding without a config.json: count keys
        h_l = [tuple(map(int, m.groups()[:2])) for k in tensors if (m := _FD_BLOCK.fullmatch(k))]
        n_heads = n_heads or (1 + max((h for h, _ in h_l), default=-1))
        n_layers = n_layers or (1 + max((l for _, l in h_l), default=-1))
    if found.layout == "vllm":
        tensors = _vllm_tensors(found, raw, tensors, n_heads)
    sd = {(_to_ours(k, found.layout, n_layers) or k): v for k, v in tensors.items()}
    if n_heads <= 0 or n_layers <= 0:
        raise _fail(found.weights, "holds no Medusa blocks")
    first = sd.get("blocks.0.0.linear.weight")
    proj = [sd[f"lm_heads.{h}.weight"] for h in range(n_heads) if f"lm_heads.{h}.weight" in sd]
    hidden = raw.get("hidden_size") or (first.shape[-1] if first is not None else hidden_size)
    vocab = raw.get("vocab_size") or (proj[0].shape[0] if proj else vocab_size)
    if hidden is None or vocab is None:
        raise _fail(found.weights, "hidden_size/vocab_size are neither in the config nor inferable "
                    "from the tensors (blocks.0.0 / lm_heads.0 missing)")
    bias = bool(raw.get("medusa_fc_bias", False)) if found.layout == "vllm" else \
        any(k.endswith(".linear.bias") for k in sd)
    fields = dict(hidden_size=hidden, vocab_size=vocab, num_heads=n_heads, num_layers=n_layers,
                  own_lm_heads=bool(proj), bias=bias, base_model=raw.get("base_model_name_or_path"))
    cfg = _meta_config(found, meta, fields)
    if not cfg.own_lm_heads:  # our own metadata says the projections are copies of the base lm_head
        sd = {k: v for k, v in sd.items() if not _OURS_LM.fullmatch(k)}
    return cfg, sd


def _first_int(raw: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        if isinstance(raw.get(key), int):
            return raw[key]
    return None


def _vllm_tensors(found: _Found, raw: dict[str, Any], tensors: dict[str, Tensor],
                             n_heads: int) -> dict[str, Tensor]:
    """Refuse a truncated vocab; `original_lm_head: true`: one lm_head (key lm_head.weight or
    lm_heads.0.weight, as vLLM reads it) serves all heads."""
    if raw.get("truncated_vocab_size") not in (None, raw.get("vocab_size")) or "token_map" in tensors:
        raise _fail(found.weights, "uses a truncated vocabulary (token_map), which medusa_vllm does "
                    "not support",
                    "use heads over the full vocabulary")
    if not raw.get("original_lm_head"):
        return tensors
    tensors = dict(tensors)
    shared = tensors.pop("lm_head.weight", None)
    shared = tensors.pop("lm_heads.0.weight", None) if shared is None else shared
    if shared is None:
        raise _fail(found.weights, "missing tensor lm_head.weight (config.json sets original_lm_head)")
    tensors.update({f"lm_heads.{h}.weight": shared for h in range(n_heads)})  # one storage, K views
    return tensors


def _ours_config(file: Path, raw: dict[str, Any]) -> MedusaHeadsConfig:
    raw = dict(raw)
    fmt, version = raw.pop("format", None), raw.pop("version", None)
    if fmt != "medusa_vllm":
        raise _fail(file, f'has "format": {fmt!r}, expected "medusa_vllm"')
    if not isinstance(version, int):
        raise _fail(file, 'has no integer "version"')
    if version > FORMAT_VERSION:
        raise _fail(file, f"has format version {version!r}; this medusa_vllm reads up to {FORMAT_VERSION}",
                    "upgrade medusa_vllm")
    try:
        return MedusaHeadsConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise _fail(file, f"invalid config ({e})") from None


def _meta_config(found: _Found, meta: Any, fields: dict[str, Any]) -> MedusaHeadsConfig:
    """Our config from the stored fields, or from our own metadata when that agrees with them.

    The metadata decides own_lm_heads (False: the stored projections are copies of the base
    lm_head) and, for FasterDecoding, bias; vLLM's bias is what vLLM reads: medusa_fc_bias.
    """
    if isinstance(meta, dict):
        m = _ours_config(found.config or found.weights, meta)
        if all(getattr(m, k) == fields[k] for k in ("hidden_size", "vocab_size", "num_heads", "num_layers")):
            return m if found.layout == "fasterdecoding" else replace(m, bias=fields["bias"])
    try:
        return MedusaHeadsConfig(**fields)
    except ValueError as e:
        raise _fail(found.config or found.weights, f"invalid config ({e})") from None


def _check_size(file: Path, what: str, stored: int, expected: int | None) -> None:
    if expected is not None and stored != expected:
        raise _fail(file, f"{what} {stored} does not match the model's {expected}", _RETRAIN)


def _check_tensors(found: _Found, cfg: MedusaHeadsConfig, sd: dict[str, Tensor]) -> None:
    """Missing / unexpected tensors, shapes, NaN/Inf; names as stored in the file."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MedusaHeads(cfg).state_dict().items()}

    def stored(key: str) -> str:  # our key -> its name in the file
        return _from_ours(key, found.layout, cfg.num_layers)

    shape_of = f"num_heads={cfg.num_heads}, num_layers={cfg.num_layers}, bias={cfg.bias}, " \
               f"own_lm_heads={cfg.own_lm_heads}"
    missing = sorted(stored(k) for k in expected.keys() - sd.keys())
    if missing:
        raise _fail(found.weights, f"missing tensors {_short(missing)} (config: {shape_of})")
    unexpected = sorted(stored(k) for k in sd.keys() - expected.keys())
    if unexpected:
        hint = (" (config.json has medusa_fc_bias false: vLLM would silently drop these biases; "
                "set it true)") if found.layout == "vllm" and any(".bias" in k for k in unexpected) else ""
        raise _fail(found.weights, f"unexpected tensors {_short(unexpected)}{hint} (config: {shape_of})")
    for key, shape in expected.items():
        if tuple(sd[key].shape) != shape:
            raise _fail(found.weights, f"tensor {stored(key)} has shape {list(sd[key].shape)}, expected "
                        f"{list(shape)} (hidden_size={cfg.hidden_size}, vocab_size={cfg.vocab_size})")
    seen = set()  # vLLM original_lm_head: K keys, one storage
    for key, tensor in sd.items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise _fail(found.weights, f"tensor {stored(key)} holds NaN or Inf values",
                        "training diverged or the file is damaged; retrain or re-save the heads")


def _short(names: list[str], limit: int = 4) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---------------------------------------------------------------------------------------------
# conversion helpers and CLI
# ---------------------------------------------------------------------------------------------
def convert_heads(src: str | Path, dst: str | Path, layout: str, *,
                  lm_head_weight: Tensor | None = None, dtype: torch.dtype | None = None) -> Path:
    """Load heads from `src` (any layout) and write them to `dst` in `layout` (dtype None: as stored)."""
    heads = load_heads(src)
    dtype = dtype or next(heads.parameters()).dtype
    return save_heads(heads, dst, layout, lm_head_weight=lm_head_weight, dtype=dtype)


def load_lm_head_weight(model_dir: str | Path, *, device: str | torch.device = "cpu") -> Tensor:
    """The lm_head weight [V, H] of an HF model folder (safetensors; tied embeddings handled)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise _fail(model_dir, "base model folder does not exist", "pass the base model's HF folder")
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickled = [p for s in PICKLE_SUFFIXES for p in model_dir.glob("*" + s)]
        raise _pickled(pickled[0]) if pickled else _fail(model_dir, "holds no *.safetensors files",
                                                         "pass the base model's HF folder")
    config = _read_json(model_dir / HF_CONFIG) if (model_dir / HF_CONFIG).exists() else {}
    names = ["lm_head.weight"]
    if config.get("tie_word_embeddings", True):
        names += ["model.embed_tokens.weight", "embed_tokens.weight"]
    for name in names:
        for file in files:
            try:
                with safe_open(str(file), framework="pt", device=str(device)) as f:
                    if name in f.keys():
                        return f.get_tensor(name)
            except Exception as e:
                raise _fail(file, f"is truncated or corrupt ({e})") from None
    raise _fail(model_dir, f"no tensor named {' or '.join(names)} in its safetensors files",
                "pass the base model's HF folder")


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medusa_vllm.checkpoint",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert heads between layouts")
    conv.add_argument("src", help="heads folder or weights file, any layout")
    conv.add_argument("dst", help="output folder")
    conv.add_argument("--layout", choices=LAYOUTS, required=True)
    conv.add_argument("--base-model",
                      help="base model HF folder: its lm_head is written for heads that share it")
    conv.add_argument("--dtype", choices=sorted(_DTYPES), help="default: as stored")
    info = sub.add_parser("info", help="print the config of a heads checkpoint")
    info.add_argument("path")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            print(json.dumps(load_heads(args.path).config.to_dict(), indent=2))
            return
        lm_head = load_lm_head_weight(args.base_model) if args.base_model else None
        out = convert_heads(args.src, args.dst, args.layout, lm_head_weight=lm_head,
                            dtype=_DTYPES.get(args.dtype))
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(out)


if __name__ == "__main__":
    main()
