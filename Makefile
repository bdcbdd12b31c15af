# The two commands of the README's quick start; each sets itself up from a bare clone.
VENV := .venv
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test bench-dp bench-memory

$(STAMP): pyproject.toml scripts/setup-venv.sh
	bash scripts/setup-venv.sh

## demo: the default training run (plait train with its defaults)
demo: $(STAMP)
	$(VENV)/bin/plait train

## test: the whole test suite
test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

## bench-dp: plait's data parallelism against torch DDP (prints a table; a few minutes)
bench-dp: $(STAMP)
	$(VENV)/bin/python benchmarks/data_parallel.py

## bench-memory: each rank's predicted and measured peak memory and step time, plait and torch (a table; tens of minutes)
bench-memory: $(STAMP)
	$(VENV)/bin/python benchmarks/memory.py
