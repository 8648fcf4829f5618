# Two commands on a fresh machine: `make demo` (the CPU model organism end to end) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv test lint demo clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"   # CPU wheel first, so nothing pulls a CUDA build
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

test: venv
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -q

lint: venv
	$(BIN)/ruff check .

demo: venv
	OMP_NUM_THREADS=1 $(BIN)/routed-grpo demo --out runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache
