# Batch Normalization, Executable — every target creates .venv by itself.
#   make book     build the HTML book into _build/html (no network needed once installed)
#   make test     lint, the book build with -W, then unit/property/parity tests, every
#                 notebook by nbval (strict) and the built pages in Chromium (one pytest
#                 run on two processes)
#   make lab      JupyterLab in the project environment, opened on book/
#   make browser-test  build the book and check its pages in Chromium only
#   make pdf      the whole book as _build/latex/batchnorm-executable.pdf (needs TeX Live:
#                 apt-get install texlive-latex-extra texlive-xetex
#                 texlive-fonts-recommended fonts-freefont-otf latexmk)
#   make execute  re-execute every notebook in place (stored outputs = what nbval recomputes)
#   make lint     ruff (lint + format check) on companion, tests and the notebooks,
#                 mypy on companion, actionlint on .github/workflows
#   make test-no-tf  the unit tests not marked `tf`, in a venv without TensorFlow
#   make robustness  every Part III experiment at CI scale with seeds the book never
#                 uses: every verdict must come out as its chapter states
#   make clean    remove build products (keeps .venv)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# TensorFlow logs to stderr at import unless this is set before Python starts.
export TF_CPP_MIN_LOG_LEVEL := 3
# Deterministic kernels and hashing for every process started from here.
export PYTHONHASHSEED := 0
export TF_DETERMINISTIC_OPS := 1
# No progress bars in stored notebook outputs (readers running Jupyter get them).
export COMPANION_NO_PROGRESS := 1

.PHONY: book test execute lint clean install test-no-tf lab browser-test pdf robustness

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,book]"
	touch $(STAMP)

book: $(STAMP)
	$(VENV)/bin/jupyter-book build . -W -n --keep-going

# The book is built first: tests/test_rendered_book.py and test_launch.py
# read _build/html (REQUIRE_BOOK_BUILD=1: a missing build fails, not skips).
# On both cores (pytest-xdist): --dist loadscope keeps each notebook's cells,
# and each test module, on one worker; --no-loadscope-reorder keeps the
# longest-first order of conftest.py (xdist would sort by number of tests).
test: $(STAMP) lint
	$(VENV)/bin/jupyter-book build . -W -n --keep-going
	REQUIRE_BOOK_BUILD=1 $(PY) -m pytest -n 2 --dist loadscope --no-loadscope-reorder

browser-test: book
	REQUIRE_BOOK_BUILD=1 $(PY) -m pytest tests/test_rendered_book.py --no-cov -p no:cacheprovider

pdf: $(STAMP)
	$(VENV)/bin/jupyter-book build . --builder pdflatex

# Kernels start in the notebook's folder with this Makefile's environment
# (no progress bars, so a saved notebook stays what nbval compares).
lab: $(STAMP)
	$(VENV)/bin/jupyter lab book/

execute: $(STAMP)
	$(PY) tests/execute_notebooks.py book

# `make test` runs these tests too (they are part of tests/); this target
# runs them alone, on both cores.
robustness: $(STAMP)
	$(PY) -m pytest tests/test_robustness.py -m robustness -n 2 --no-cov -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check companion tests book conftest.py
	$(VENV)/bin/ruff format --check companion tests book conftest.py
	$(VENV)/bin/mypy
	$(VENV)/bin/actionlint

# The package and the unit tests without TensorFlow: a second venv (inside
# .venv, so that nothing else sees it) with [data,plot] and [test]'s tools.
NOTF       := $(VENV)/no-tf
NOTF_PY    := $(NOTF)/bin/python
NOTF_STAMP := $(NOTF)/.installed

$(NOTF_STAMP): pyproject.toml
	test -x $(NOTF_PY) || $(PYTHON) -m venv $(NOTF)
	$(NOTF_PY) -m pip install --quiet --upgrade pip
	$(NOTF_PY) -c "import tomllib" 2>/dev/null || $(NOTF_PY) -m pip install --quiet tomli
	$(NOTF_PY) tests/extra_requirements.py test --without tf > $(NOTF)/requirements.txt
	$(NOTF_PY) -m pip install --quiet -e ".[data,plot]" -r $(NOTF)/requirements.txt
	touch $(NOTF_STAMP)

test-no-tf: $(NOTF_STAMP)
	! $(NOTF_PY) -c "import tensorflow" 2>/dev/null
	$(NOTF_PY) -m pytest tests -m 'not tf' --no-cov -p no:cacheprovider

clean:
	rm -rf _build .pytest_cache .hypothesis .coverage htmlcov
