# Two commands matter: `make demo` and `make test`. Both install into .venv/ first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench clean gpu-check gpu-wheels

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

demo: $(STAMP)
	$(PY) -m nsoclip.demo

# On a machine with one CUDA GPU (its own python3, no registry): `make gpu-check` (DRY=1: list the
# steps). The wheels it installs come from `make gpu-wheels`, run where PyPI is reachable.
GPU_PYTHON ?= python3
OUT ?= gpu-check-out
GPU_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(p))

gpu-check:
	OUT=$(OUT) PYTHON=$(GPU_PYTHON) bash scripts/gpu_check.sh $(if $(DRY),--dry-run)

gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(GPU_PLATFORMS) -d .whl -r scripts/gpu-wheels.txt
	$(PY) -m nsoclip.bench.gpu_check --check-wheels .whl

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
