# The two commands of the README's quick start. Both set everything up from a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: demo test test-fast browser prometheus pm2 lint format setup clean sdk-src

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

# The main job: a whole network on this machine: 4 honest miners, one of each cheat, a validator,
# 20 windows of 30 s (about 11 minutes on 2 cores).
demo: $(STAMP)
	$(VENV)/bin/bistro localnet --preset tiny --miners 15 --validators 1 --windows 20 --block-time 3 \
		--personas honest,honest,honest,honest,idle,freeloader,noise,copycat,poison,stale,backdater,noisy_copier,blender,copy_finetune,shaped_copier \
		--dir runs/demo
	$(VENV)/bin/bistro report runs/demo

# tests/unit/test_report.py opens the report in headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || \
		echo "tests/unit/test_report.py needs chromium: sudo apt-get install chromium"

# tests/integration/test_prometheus.py scrapes a localnet with a real Prometheus (Debian's package: prometheus, promtool).
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && \
		command -v apt-get >/dev/null && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; } || \
		echo "tests/integration/test_prometheus.py needs prometheus: sudo apt-get install prometheus"

# tests/integration/test_supervision.py keeps a node alive with the real pm2 (npm), installed under ~/.cache
# (BISTRO_PM2), never into this repository.
PM2_DIR ?= $(or $(BISTRO_PM2),$(HOME)/.cache/bistro/pm2)
pm2:
	@test -x $(PM2_DIR)/node_modules/.bin/pm2 || { command -v npm >/dev/null && \
		npm install --silent --no-fund --no-audit --prefix $(PM2_DIR) pm2; } || \
		echo "tests/integration/test_supervision.py needs pm2: install nodejs and npm, then make pm2"

# The installed bittensor SDK's source release: its test harness (FakeSubstrate, FakeNode, the
# recorded runtime's metadata and value shapes) drives tests/unit/test_chain_subtensor.py. A dependency,
# unpacked under ~/.cache (BISTRO_SDK_SRC), never copied into this repository.
SDK_SRC ?= $(or $(BISTRO_SDK_SRC),$(HOME)/.cache/bistro/sdk-src)
sdk-src: $(STAMP)
	BISTRO_SDK_SRC=$(SDK_SRC) $(PY) -c "from tests.support.bittensor_sdk import fetch_source; print(fetch_source())"

# Tests run on two pytest-xdist workers, one torch thread each, a file at a time on one worker (so a
# module's shared local network runs once), in the order tests/conftest.py gives the files.
# PYTEST_WORKERS= runs them in one process.
PYTEST_WORKERS ?= -n 2 --dist loadfile --no-loadscope-reorder

# Lint, format check and the whole test suite.
test: $(STAMP) browser prometheus pm2 sdk-src
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q $(PYTEST_WORKERS)

# The inner loop: every test except those that start processes (marked slow); about ten minutes on 2 cores.
test-fast: $(STAMP) browser
	$(PY) -m pytest -q $(PYTEST_WORKERS) -m "not slow"

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
