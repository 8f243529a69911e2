# Two set-up commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

$(BIN)/mergekit-seed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[test,eval,ray]" -c constraints.txt
	touch $@

install: $(BIN)/mergekit-seed

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/mergekit-seed demo --out demo-out

# two workers, a test file each at a time (a file's fixtures are built once): 10.3 min on a quiet
# 2-core machine against 14.5 min in one process
test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

# ruff, configured in pyproject.toml as PEFT configures it (line length 119): run by CI
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mergekit 0.1.5's own test modules, from its sdist, with our plugin installed: the plugin must
# not break its host. (The sdist lacks tests/common.py, so the six modules that import it,
# test_basic_merges.py among them, cannot run from it and are left out.)
host-tests: install
	rm -rf .host-tests && mkdir .host-tests
	$(BIN)/pip download mergekit==0.1.5 --no-binary :all: --no-deps --quiet -d .host-tests
	tar xzf .host-tests/mergekit-0.1.5.tar.gz -C .host-tests
	$(BIN)/python -c "from mergekit.merge_methods import registry; registry.get('seedft')"  # the plugin is active
	cd .host-tests/mergekit-0.1.5 && HF_HUB_OFFLINE=1 ../../$(BIN)/python -m pytest -q -p no:cacheprovider \
	    $$(grep -L "from tests" tests/test_*.py)

.PHONY: install demo test lint host-tests
