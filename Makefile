# Two commands on a fresh clone:  `make demo`  (the embedded CPU example)  and  `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Without a GPU the Triton kernels run in Triton's interpreter.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TEST_ENV := $(if $(HAS_GPU),,TRITON_INTERPRET=1) PYTHONUNBUFFERED=1

.PHONY: install test demo ablation bench gpu-wheels clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a bare `torch` requirement would pull the CUDA build on a CPU machine.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(TEST_ENV) $(PY) -m pytest tests -q -ra

demo: install
	$(TEST_ENV) $(PY) -m uniopd_mcore.cli demo --run-dir runs/demo

ablation: install
	$(TEST_ENV) $(PY) benchmarks/recipe_ablation.py

bench: install
	$(TEST_ENV) $(PY) benchmarks/kernels.py

# The wheels a lent GPU machine lacks (it reaches no package index; its Python is 3.12), for
# tools/gpu_session.sh: carry .gpu_wheels with the command.
GPU_PY ?= 3.12
gpu-wheels: install
	rm -rf .gpu_wheels
	$(PY) -m pip download -q -d .gpu_wheels --no-deps --only-binary=:all: --python-version $(GPU_PY) \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform any \
	  megatron-core==0.16.1 mbridge==0.15.1 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 \
	  math-verify==0.9.0 latex2sympy2_extended==1.11.0

clean:
	rm -rf $(VENV) runs build *.egg-info .gpu_wheels
