PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-systemd soak chaos bench demo lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost $(BIN)/python -m pytest -q

# The shipped unit under a real systemd (a booted Debian container; root, mmdebstrap,
# systemd-container). The rootfs is cached in .cache/systemd/.
test-systemd: $(STAMP)
	NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost $(BIN)/python -m pytest -q -s -m systemd -o addopts='' tests/systemd

soak: $(STAMP)
	NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost $(BIN)/python -m pytest -q -m soak -o addopts=''

# The chaos suite (tests/chaos/, about 15 min on 2 cores; each scenario has its own deadline).
# Prints the summary table at the end; the figures go to $$OSSYNCD_CHAOS_REPORT when set.
chaos: $(STAMP)
	NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost $(BIN)/python -m pytest -q -m chaos -o addopts='' -p no:cacheprovider tests/chaos

bench: $(STAMP)
	NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost $(BIN)/python -m tests.bench

demo: $(STAMP)
	NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost $(BIN)/python -m tests.demo

lint: $(STAMP)
	$(BIN)/python -m pyflakes daemon tests
	$(BIN)/python -m ruff check daemon tests
	$(BIN)/python -m mypy

clean:
	rm -rf $(VENV) .pytest_cache demo-data
