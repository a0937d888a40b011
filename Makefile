# maxscale: `make train` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: install install-all train test test-fast lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Training needs the package and the analysis tools; the suite also checks the optional integrations (tokenizer
# libraries, the Hugging Face export against transformers + CPU torch, W&B), so it installs every extra.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,analysis]'
	touch $@

# torch before the hf extra: `transformers` needs torch, and an unpinned torch resolves to a CUDA build (15
# nvidia-* packages, 3.2 GB) even on a machine without a GPU. TORCH_CPU pins the release (a pip that finds a local
# CPU wheel of it takes that); on a machine without one, `make install-all TORCH_INDEX=https://download.pytorch.org/
# whl/cpu` takes PyTorch's CPU build. On a GPU machine, `make install-all TORCH_CPU=` skips this step.
TORCH_CPU   ?= torch==2.13.0
TORCH_INDEX ?=
$(VENV)/.torch: $(VENV)/.installed
	if [ -n "$(TORCH_CPU)" ] && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  $(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_CPU)"; fi
	touch $@

$(VENV)/.installed-all: $(VENV)/.torch
	$(BIN)/python -m pip install -q -e '.[test,analysis,data,hf,wandb]'
	touch $@

install: $(VENV)/.installed
install-all: $(VENV)/.installed-all

## Train the default model on the embedded corpus (the Python standard library's sources).
train: install
	$(BIN)/python -m maxscale.train --config=configs/stdlib.py --workdir=runs/stdlib $(ARGS)

## The whole suite, heavy cases included, in TEST_WORKERS processes (pytest-xdist; each test file stays in one
## worker, so a module's compiled fixtures are built once). TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
test: install-all
	$(BIN)/python -m pytest -q $(XDIST) --durations=20 $(ARGS)

## Everything but the cases marked slow.
test-fast: install-all
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow" $(ARGS)

## One style everywhere: ruff lint + format check (configured in pyproject.toml).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## Rewrite the tree in that style.
format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python tools/bench.py --config=configs/base.py --config.model.width=512 --config.model.num_heads=8 \
	  --config.data.seq_len=256 --config.train.batch_size=16 $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
