# The two commands of the README: `make run` serves Hearth with its default models, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test fuzz lint format bench proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all,test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/hearth run $(ARGS)

# The web page's tests drive Debian's Chromium (through Playwright's Python package, with no browser download).
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium

test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check hearth tests benchmarks scripts
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fuzz suite for longer: many more generated requests per route than `make test` sends.
fuzz: $(STAMP)
	HEARTH_FUZZ_EXAMPLES=$${HEARTH_FUZZ_EXAMPLES:-300} $(BIN)/python -m pytest tests/test_fuzz.py tests/test_hostile.py $(PYTEST_ARGS)

# The code is laid out by hand (120 columns, continuation lines aligned); `ruff format` would rewrite most files,
# so lint and format stop at ruff's checks and its safe fixes (import order and the like).
lint: $(STAMP)
	$(BIN)/ruff check hearth tests benchmarks scripts

format: $(STAMP)
	$(BIN)/ruff check --fix hearth tests benchmarks scripts

bench: $(STAMP)
	$(BIN)/python benchmarks/single_stream.py

proto: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH hearth/runner/generate_proto.sh

clean:
	rm -rf $(VENV) build *.egg-info
