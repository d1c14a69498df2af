# Two entry points (README): `make demo` runs the small reproduction, `make test` the tests.
# Each creates and fills the virtual environment when it is missing or stale, with exactly
# the versions in constraints.txt (the ones the tests passed with; `make lock` refreshes it).
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/small_consistency
MODE ?= quick
PYTEST_ARGS ?=
# A Python >= 3.12 (jax >= 0.11 needs it): PYTHON=... wins, else the first that is new
# enough of python3.13, python3.12, python3, then pyenv's installed versions.
PYTHON ?= $(shell bash .ci/find_python 2>/dev/null)
# `make demo VENV=DIR` with an existing DIR/bin/python uses that environment
# as it is (nothing installed; tests/test_readme.py runs README's commands so).
AS_IS := $(and $(filter command line,$(origin VENV)),$(wildcard $(VENV)/bin/python))

# tcmalloc, preloaded for the demo when installed (optconsist_jax/platforms/allocator.py
# globs the same paths): XLA's CPU runtime re-maps its large temporaries every
# step under glibc malloc; tcmalloc keeps them. Optional; TCMALLOC= turns it off.
TCMALLOC ?= $(firstword $(wildcard /usr/lib/*/libtcmalloc_minimal.so.4 \
  /usr/lib64/libtcmalloc_minimal.so.4 /usr/lib/libtcmalloc_minimal.so.4))

.PHONY: demo test rehearsal venv lock clean-venv

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { bash .ci/find_python >/dev/null; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $@

# The matrix mode's PSGD Kron row and column need the kron extra (psgdax).
$(VENV)/.installed-kron: $(VENV)/.installed
	$(PY) -m pip install -q -c constraints.txt -e '.[kron]'
	touch $@

# The test extra adds pytest and libtpu (the planner's TPU-topology test).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: $(if $(AS_IS),,$(VENV)/.installed $(if $(filter matrix,$(MODE)),$(VENV)/.installed-kron))
	$(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC) )$(PY) -m optconsist_jax.experiments.reproduce \
	  --config configs/small_consistency.py:$(MODE) --workdir $(WORKDIR)

test: $(if $(AS_IS),,$(VENV)/.installed-test)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
	  $(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

# The pod rehearsal (README, "Before your first pod run"): 4 processes x 2 CPU
# devices on a local GCS emulator, which the test extra installs.
# REHEARSAL_ARGS=... passes flags (python -m optconsist_jax.tools.rehearse --help).
REHEARSAL_ARGS ?=
rehearsal: $(if $(AS_IS),,$(VENV)/.installed-test)
	$(PY) -m optconsist_jax.tools.rehearse $(REHEARSAL_ARGS)

# Re-resolve the newest versions in a scratch venv, run the tests there, and write
# constraints.txt only if they pass.
lock:
	@test -n "$(PYTHON)" || { bash .ci/find_python >/dev/null; exit 1; }
	rm -rf $(VENV)-lock && $(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip install -q --upgrade pip
	$(VENV)-lock/bin/python -m pip install -q -e '.[test]'
	XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
	  $(VENV)-lock/bin/python -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)
	{ echo "# Exact versions the test suite passed with ($$($(VENV)-lock/bin/python -V)); written by 'make lock'."; \
	  $(VENV)-lock/bin/python -m pip freeze --exclude-editable --exclude optconsist_jax; } > constraints.txt
	rm -rf $(VENV)-lock
	@echo "constraints.txt updated; run 'make clean-venv test' to use it"

clean-venv:
	rm -rf $(VENV)
