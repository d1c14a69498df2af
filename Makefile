# Two entry points (README): `make demo` runs the small reproduction, `make test` the tests.
# Each creates and fills the virtual environment when it is missing or stale.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/small_consistency
MODE ?= quick
PYTEST_ARGS ?=

.PHONY: demo test venv clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# The test extra adds pytest and libtpu (the planner's TPU-topology test).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m optconsist_jax.reproduce \
	  --config configs/small_consistency.py:$(MODE) --workdir $(WORKDIR)

test: $(VENV)/.installed-test
	XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
	  $(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
