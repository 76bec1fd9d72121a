# The two README commands: `make demo` and `make test`. Each creates (or reuses) the
# virtual environment in .venv, installs fastpurify into it, then runs its job.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fastpurify-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fastpurify demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	mkdir -p bench/results
	$(BIN)/python -m pytest bench --benchmark-enable --benchmark-columns=median,min,max,rounds --benchmark-json=bench/results/latest.json

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .benchmarks
