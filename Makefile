# Two commands: `make demo` and `make test`. Both create .venv on first use and are idempotent.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test venv clean

venv: $(STAMP)

# torch==2.13.0 first: on CPU machines pip takes the CPU build already on disk, and the
# package's own `torch` requirement is then satisfied without pulling the CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,video,notebooks,comfy]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mesh-ray demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
