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

# Two workers: most of a test's time is waiting on a daemon, emulator or broker subprocess.
test: $(STAMP)
	NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost $(BIN)/python -m pytest -q -n 2 --durations=25

# The shipped unit under a real systemd (a booted Debian container; root, mmdebstrap,
# systemd-container). The rootfs is cached in .cache/systemd/.
test-systemd: $(STAMP)
	NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost $(BIN)/python -m pytest -q -s -m systemd -o addopts='' tests/systemd

soak: $(STAMP)
	NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost $(BIN)/python -m pytest -q -m soak -o addopts=''

# The chaos suite (tests/chaos/; each scenario has its own deadline). The outages mostly wait,
# so they run (with the state-DB scenarios) beside the kills and faults: 15-20 min on 2 cores. Exits non-zero if either
# half fails; prints the summary table of both (the figures: $(CHAOS_REPORT)).
CHAOS_REPORT ?= .cache/chaos-report.jsonl
CHAOS_PYTEST := NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost OSSYNCD_CHAOS_REPORT=$(CHAOS_REPORT) \
	$(BIN)/python -m pytest -q -m chaos -o addopts='' -p no:cacheprovider

chaos: $(STAMP)
	mkdir -p $(dir $(CHAOS_REPORT)) && rm -f $(CHAOS_REPORT)
	$(CHAOS_PYTEST) tests/chaos/test_outages.py tests/chaos/test_storage.py > $(CHAOS_REPORT).outages.log 2>&1 & outages=$$!; \
	$(CHAOS_PYTEST) tests/chaos/test_kills.py tests/chaos/test_faults.py; busy=$$?; \
	wait $$outages; out=$$?; cat $(CHAOS_REPORT).outages.log; \
	$(BIN)/python -m tests.chaos.report $(CHAOS_REPORT); \
	test $$busy -eq 0 -a $$out -eq 0

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
