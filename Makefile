# The two commands of the README: `make run` serves Hearth with its default models, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format bench proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all,test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/hearth run $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check hearth tests benchmarks
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check hearth tests benchmarks
	$(BIN)/ruff format --check hearth tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format hearth tests benchmarks
	$(BIN)/ruff check --fix hearth tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/single_stream.py

proto: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH hearth/runner/generate_proto.sh

clean:
	rm -rf $(VENV) build *.egg-info
