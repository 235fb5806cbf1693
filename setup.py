"""Builds medusa_vllm._C, the extension that registers torch.ops.medusa_vllm.* (see csrc/).

Package metadata lives in pyproject.toml; this file only adds the extension.

    pip install --no-build-isolation -e .          # or: python setup.py build_ext --inplace

CPU kernels are always built. CUDA kernels are built when MEDUSA_VLLM_CUDA is
  "1":             always (fails without a CUDA toolkit),
  "0":             never,
  unset / "auto":  when a complete CUDA toolkit exists (nvcc, runtime headers, libcudart), torch
                   is a CUDA build and nvcc's major version equals torch.version.cuda's major.
GPU architectures: TORCH_CUDA_ARCH_LIST if set, else sm_90a (H100) plus sm_80 and compute_80 PTX.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

CSRC = "csrc"
CPU_SOURCES = ["bindings.cpp", "tree_attention_cpu.cpp", "move_accepted_kv_cpu.cpp", "keyed_uniforms_cpu.cpp",
               "target_probs_cpu.cpp", "rejection_walk_cpu.cpp"]
CUDA_SOURCES = [
    "tree_attention_cuda.cu",
    "tree_attention_cuda_bf16.cu",
    "tree_attention_cuda_fp16.cu",
    "move_accepted_kv_cuda.cu",
    "keyed_uniforms_cuda.cu",
    "target_probs_cuda.cu",
    "rejection_walk_cuda.cu",
]
DEFAULT_GENCODE = [
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_80,code=compute_80",
]
# -fno-trapping-math lets GCC if-convert (vectorize) the CPU softmax loops; results are unchanged.
CXX_FLAGS = ["-O3", "-std=c++17", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr", "-DMEDUSA_VLLM_WITH_CUDA"]


def log(msg: str) -> None:
    print(f"[medusa_vllm setup] {msg}", file=sys.stderr)


def is_complete_toolkit(root: str | None) -> bool:
    """nvcc, the runtime headers and libcudart: what a CUDA extension build needs."""
    return bool(root) and (
        os.path.exists(os.path.join(root, "bin", "nvcc"))
        and os.path.exists(os.path.join(root, "include", "cuda_runtime.h"))
        and bool(glob.glob(os.path.join(root, "lib*", "libcudart.so*")))
    )


def locate_cuda_home() -> None:
    """Points CUDA_HOME at a complete toolkit before torch.utils.cpp_extension reads it. (torch
    takes dirname(dirname(which nvcc)), which is wrong for a wrapper script such as a
    /usr/local/bin/nvcc that execs /usr/local/cuda-X/bin/nvcc.)"""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        with open(nvcc, "rb") as f:  # a wrapper script names the nvcc it runs
            head = f.read(4096).decode(errors="ignore")
        candidates += [os.path.dirname(os.path.dirname(m)) for m in re.findall(r"(/\S+)/bin/nvcc\b", head)]
    candidates.append("/usr/local/cuda")
    found = next((c for c in candidates if is_complete_toolkit(c)), None)
    if found:
        os.environ["CUDA_HOME"] = found


def nvcc_major(cuda_home: str | None) -> int | None:
    if not cuda_home:
        return None
    try:
        text = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                              text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.", text)
    return int(match.group(1)) if match else None


def want_cuda() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    mode = os.environ.get("MEDUSA_VLLM_CUDA", "auto").strip().lower()
    if mode in ("0", "off", "false", "no"):
        log("MEDUSA_VLLM_CUDA=0: building CPU kernels only")
        return False
    if mode in ("1", "on", "true", "yes"):
        if CUDA_HOME is None:
            raise RuntimeError("MEDUSA_VLLM_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        return True
    nvcc, torch_cuda = nvcc_major(CUDA_HOME), torch.version.cuda
    if nvcc is None or torch_cuda is None or not is_complete_toolkit(CUDA_HOME):
        log(f"CUDA kernels skipped (CUDA_HOME: {CUDA_HOME}, nvcc major: {nvcc}, torch CUDA: {torch_cuda})")
        return False
    if nvcc != int(torch_cuda.split(".")[0]):
        log(f"CUDA kernels skipped: nvcc major {nvcc} != torch CUDA {torch_cuda}")
        return False
    return True


def make_extension():
    from torch.utils import cpp_extension

    sources = [os.path.join(CSRC, s) for s in CPU_SOURCES]
    common = dict(
        name="medusa_vllm._C",
        include_dirs=[os.path.abspath(CSRC)],
        py_limited_api=True,  # torch then compiles with -DPy_LIMITED_API (its CPython floor)
    )
    if not want_cuda():
        return cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": CXX_FLAGS}, **common)
    nvcc_flags = list(NVCC_FLAGS)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        nvcc_flags += DEFAULT_GENCODE  # torch adds no arch flags of its own when -gencode is given
    log(f"building CUDA kernels with {cpp_extension.CUDA_HOME} "
        f"(arch: {os.environ.get('TORCH_CUDA_ARCH_LIST') or 'sm_90a + sm_80 + PTX'})")
    return cpp_extension.CUDAExtension(
        sources=sources + [os.path.join(CSRC, s) for s in CUDA_SOURCES],
        extra_compile_args={"cxx": CXX_FLAGS + ["-DMEDUSA_VLLM_WITH_CUDA"], "nvcc": nvcc_flags},
        **common,
    )


def main() -> None:
    locate_cuda_home()
    from torch.utils import cpp_extension  # reads CUDA_HOME at import

    setup(
        ext_modules=[make_extension()],
        cmdclass={"build_ext": cpp_extension.BuildExtension},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )


main()
