# Two set-up commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

$(BIN)/mergekit-seed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[test,eval]" -c constraints.txt
	touch $@

install: $(BIN)/mergekit-seed

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/mergekit-seed demo --out demo-out

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

.PHONY: install demo test
