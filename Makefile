# Two commands on a fresh machine with Python >= 3.10 and make:
#   make demo   a virtual environment in .venv with torch and ntkrun, then a quick real run
#   make test   the same environment with the test extras, then lint, the whole suite and the docs
#   make docs   the documentation site in site/, built strictly (a broken link or reference fails)
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# Where torch comes from: the default index serves CPU builds on this project's machines; elsewhere
# pass the CPU wheel index of pytorch.org (see its "get started" page), e.g. make demo TORCH_INDEX=...
TORCH_INDEX ?=
BIN := $(VENV)/bin

.PHONY: demo test docs clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "ntkrun needs Python >= 3.10, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	@touch $@

$(VENV)/.ntkrun: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e .
	@touch $@

$(VENV)/.ntkrun-test: pyproject.toml $(VENV)/.ntkrun
	$(BIN)/pip install -q -e ".[test,docs]"
	@touch $@

demo: $(VENV)/.ntkrun
	$(BIN)/ntkrun convergence --preset quick
	@echo "figure: $$(cd outputs/convergence/latest && pwd -P)/figure.png"

test: $(VENV)/.ntkrun-test
	$(BIN)/ruff check .
	$(MAKE) docs
	$(BIN)/python -m pytest -q

docs: $(VENV)/.ntkrun-test
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) outputs site
