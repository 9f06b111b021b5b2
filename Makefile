# The README's two commands: `make demo` and `make test`. Both create .venv when absent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: demo test test-all install docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The package metadata lives in pyproject.toml; the version in keras_ntk/__init__.py.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e ".[test,experiments]"
	touch $(STAMP)

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,experiments,docs]"
	touch $(DOCS_STAMP)

install: $(STAMP)

# Test files run in this many processes (pytest-xdist; one file stays in one process, so
# its module fixtures run once). Each process holds its own TensorFlow runtime.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PYTEST) -m "not slow" tests

test-all: $(DOCS_STAMP)
	$(PYTEST) tests

demo: $(STAMP)
	$(PY) -m experiments.linear_vs_nonlinear --gin_file=linear_vs_nonlinear/digits_demo.gin --output_dir=runs/demo

# The site (docs/ and mkdocs.yml, API reference from the docstrings) into site/.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) runs site .pytest_cache
