# overflowd: `make demo` shows the whole idea on loopback (docs/demo.md); `make test` sets up
# everything (Debian packages included, as root) and runs ruff, mypy and the whole suite.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Debian packages the test suite drives for real (see README "What the tests run").
DEB_TEST := python3-venv postgresql tshark softflowd pmacct tcpdump iproute2 ethtool procps nfdump strace knot nftables nodejs npm@npm haproxy pebble chromium libseccomp2 systemd
DEB_DEMO := python3-venv
DEB_INSTALL := python3-venv libseccomp2

# `make install` (docs/deploy.md): the package built as a wheel and installed (not editable) in
# a venv of its own under PREFIX, the commands linked into BINDIR, the systemd units, the
# system users (sysusers.d) and the docs. DESTDIR stages it all under another root (the tests:
# tests/service/test_deploy_units.py); the units and links name the paths without DESTDIR.
PREFIX      ?= /opt/overflowd
BINDIR      ?= /usr/local/bin
UNITDIR     ?= /etc/systemd/system
SYSUSERSDIR ?= /etc/sysusers.d
DOCDIR      ?= /usr/share/doc/overflowd
DESTDIR     ?=
COMMANDS    := overflowd overflowd-query overflowd-receive jfe ratelock ratelockd
UNITS       := overflowd overflowd-identity jfe ratelockd

.PHONY: install deps-install demo test lint typecheck pytest deps-test deps-demo clean fuzz jfe-acme-100 screenshots

demo: deps-demo $(VENV)/.runtime
	./scripts/demo.sh

# The demo needs the package only, not its test extras: a fresh clone's `make demo` installs
# less (`make test` installs the rest; a venv that has them is taken as it is), with uv when it
# can be had (seconds, not a minute: scripts/venv-runtime says why), else with pip.
$(VENV)/.runtime: pyproject.toml
	test $(VENV)/.installed -nt pyproject.toml || ./scripts/venv-runtime $(PYTHON) $(VENV)
	touch $@

test: deps-test $(VENV)/.installed lint typecheck pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check overflowd jfe ratelock tests $(wildcard bench)

typecheck: $(VENV)/.installed
	$(BIN)/mypy

pytest: $(VENV)/.installed
	$(BIN)/pytest $(PYTEST_ARGS)

# Longer, random-seeded property runs (the `fuzz` profile in tests/conftest.py), then the
# atheris targets for FUZZ_SECONDS each (default 60) when atheris is installed.
fuzz: $(VENV)/.installed
	HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest tests/fuzz $(PYTEST_ARGS)
	@if $(BIN)/python -c 'import atheris' 2>/dev/null; then \
	  for target in tests/fuzz/fuzz_*.py; do \
	    echo "atheris: $$target for $${FUZZ_SECONDS:-60} s"; \
	    $(BIN)/python $$target -max_total_time=$${FUZZ_SECONDS:-60} -rss_limit_mb=2048 || exit 1; \
	  done; \
	else \
	  echo "atheris is not installed: skipping the tests/fuzz/fuzz_*.py targets ($(BIN)/pip install atheris)"; \
	fi

# jfe's Show item: 100 of 100 allowed names get certificates from Pebble with its default nonce
# rejection and validation delays (0-15 s); the suite runs the same test with 5 names, delays up to 2 s.
jfe-acme-100: deps-test $(VENV)/.installed
	JFE_ACME_NAMES=100 JFE_PEBBLE_SLEEP_S=default $(BIN)/pytest -s tests/service/test_jfe_acme.py

# The dashboard's pages as docs/dashboard/*.png, from a node fed the shared trace in headless
# Chromium (docs/dashboard.md; about a minute).
screenshots: deps-test $(VENV)/.installed
	$(BIN)/python -m tests.dashboard_screenshots docs/dashboard

install: deps-install
	./scripts/install-venv $(PYTHON) "$(DESTDIR)$(PREFIX)/venv"
	install -d "$(DESTDIR)$(BINDIR)" "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(SYSUSERSDIR)" "$(DESTDIR)$(DOCDIR)"
	for c in $(COMMANDS); do ln -sfn "$(PREFIX)/venv/bin/$$c" "$(DESTDIR)$(BINDIR)/$$c"; done
	for u in $(UNITS); do \
	  sed 's#/usr/local/bin/#$(BINDIR)/#g' deploy/$$u.service > "$(DESTDIR)$(UNITDIR)/$$u.service"; \
	  chmod 644 "$(DESTDIR)$(UNITDIR)/$$u.service"; done
	install -m 644 deploy/sysusers.d-overflowd.conf "$(DESTDIR)$(SYSUSERSDIR)/overflowd.conf"
	install -m 644 README.md docs/*.md deploy/overflowd.toml.example "$(DESTDIR)$(DOCDIR)/"
	@if [ -z "$(DESTDIR)" ] && command -v systemd-sysusers >/dev/null; then \
	  systemd-sysusers "$(SYSUSERSDIR)/overflowd.conf"; fi
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed: $(PREFIX)/venv, $(BINDIR)/{$$(echo $(COMMANDS) | tr ' ' ,)}, units in $(UNITDIR)"

deps-install:
	@./scripts/apt-ensure $(DEB_INSTALL)

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
