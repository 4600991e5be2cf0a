# The two commands of the README: `make demo` and `make test`. Both set up .venv at the repo root first.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN ?= runs/demo

.PHONY: demo test venv clean lint

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch and torchvision first, at versions this machine has on disk (no multi-GB download)
	$(VPY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(VPY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ddpm train --run $(RUN) --force
	$(VENV)/bin/ddpm sample --run $(RUN) --n 64 --out $(RUN)/samples.png --seed 0
	@echo "demo: run directory $(RUN) (config.json, checkpoints/, tb/, grids/), sample grid $(RUN)/samples.png"

# two workers (pytest-xdist; each test file on one, one thread each, the longest files first: tests/conftest.py),
# then the tests marked `alone` by themselves
test: $(STAMP)
	$(VPY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 -m "not alone" tests
	$(VPY) -m pytest -q -m alone tests

lint: $(STAMP)
	$(VPY) -m pip install -q ruff && $(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
