# overflowd: `make demo` runs the main job on embedded defaults; `make test` sets up
# everything (Debian packages included, as root) and runs ruff, mypy and the whole suite.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Debian packages the test suite drives for real (see README "What the tests run").
DEB_TEST := python3-venv postgresql tshark softflowd pmacct tcpdump iproute2 ethtool procps nfdump strace knot
DEB_DEMO := python3-venv

.PHONY: demo test lint typecheck pytest deps-test deps-demo clean

demo: deps-demo $(VENV)/.installed
	./scripts/demo.sh

test: deps-test $(VENV)/.installed lint typecheck pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check overflowd jfe ratelock tests $(wildcard bench)

typecheck: $(VENV)/.installed
	$(BIN)/mypy

pytest: $(VENV)/.installed
	$(BIN)/pytest $(PYTEST_ARGS)

deps-test:
	@./scripts/apt-ensure $(DEB_TEST)

deps-demo:
	@./scripts/apt-ensure $(DEB_DEMO)

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
