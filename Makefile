# fx-planner: `make demo` plans a real model; `make test` runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint bench readme lock clean

# Installs exactly the versions in constraints.txt (see `make lock` to refresh them).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/plan llama-3-70b --cluster 2x8xH100 --batch 8 --seq 2048

test: setup
	$(BIN)/pytest -q -p no:cacheprovider --durations=40 -n 2 --dist loadfile

lint: setup
	$(BIN)/ruff check planner cost_models codegen tests benchmarks scripts

bench: setup
	@for script in benchmarks/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

# Regenerate the command outputs quoted in README.md (tests/test_readme.py diffs them).
readme: setup
	$(BIN)/python scripts/readme.py --write

# Re-resolve every dependency from pyproject.toml in a throw-away venv and pin the result.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	{ sed -n '/^#/p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable \
	  | grep -v '^-e' | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .lock-venv
	@echo "constraints.txt refreshed: run make test, then commit it"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
