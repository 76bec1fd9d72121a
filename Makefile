# The two README commands: `make demo` and `make test`. Each creates (or reuses) the
# virtual environment in .venv, installs fastpurify into it, then runs its job.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fastpurify-installed

.PHONY: demo test bench gpu-check clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fastpurify demo

# The suite runs on WORKERS processes (pytest-xdist; each test file stays on one worker, so its
# module fixtures run once); WORKERS=0 runs it in this process. Files are handed out in collection
# order, where conftest.py puts the files with slow tests first (xdist's default order, most tests
# first, left the slowest file to the end of the run on one worker).
WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadfile --no-loadscope-reorder)

bench: $(STAMP)
	mkdir -p bench/results
	$(BIN)/python -m pytest bench --benchmark-enable --benchmark-columns=median,min,max,rounds --benchmark-json=bench/results/latest.json

# The GPU proof (bench/README.md): on a CUDA machine with torch, triton and pytest already in its
# Python (no venv, no network), `make gpu-check OUT=DIR [BUDGET=480] [CIFAR=path] [STAGES=a,b]`;
# `make gpu-check DRY_RUN=1` rehearses the same plan on CPU with smoke sizes (PYTHON=.venv/bin/python);
# `make gpu-check ESTIMATE=1 [STAGES=..] [BUDGET=..]` runs nothing and prints the seconds an H200 is expected to need.
OUT ?= gpucheck-out
BUDGET ?= 480
gpu-check:
	$(PYTHON) -m fastpurify.gpucheck --out $(OUT) --budget $(BUDGET) $(if $(DRY_RUN),--dry-run) $(if $(ESTIMATE),--estimate) \
		$(if $(CIFAR),--cifar $(CIFAR)) $(if $(STAGES),--stages $(STAGES)) $(if $(COMMIT),--commit $(COMMIT))

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .benchmarks
