# Two commands on a fresh clone:  `make demo`  (the embedded CPU example)  and  `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Without a GPU the Triton kernels run in Triton's interpreter.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TEST_ENV := $(if $(HAS_GPU),,TRITON_INTERPRET=1) PYTHONUNBUFFERED=1

.PHONY: install test demo ablation bench clean

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

clean:
	rm -rf $(VENV) runs build *.egg-info
