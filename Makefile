# ft2prod: `make run` sets up and runs the whole DAG on the embedded default; `make test` sets up and runs every test;
# `make test-fast` runs the fast tier only (no root, no Debian packages, no services, no DAG runs; a few minutes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system run test test-fast lint schema dag clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@echo "installing pinned dependencies into $(VENV) (log: $(VENV)/pip.log)"
	$(BIN)/python -m pip install --no-compile -r requirements.txt -c requirements.lock > $(VENV)/pip.log 2>&1 || (tail -30 $(VENV)/pip.log; exit 1)
	$(BIN)/python -m pip install --no-compile --no-deps -e . >> $(VENV)/pip.log 2>&1
	@# Bytecode on every core (pip compiles on one: 80 s of the set-up on 2 cores, compileall 55 s). As with pip, a
	@# file that is not Python 3.11 (some packages ship such test data) is left uncompiled: hence the `|| true`.
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >> $(VENV)/pip.log 2>&1 || true
	touch $@

# Debian packages the tests use for real (needs root, as on CI); only missing ones are installed:
# SoftHSM2 (a PKCS#11 HSM); slurm-wlm, slurmdbd, munge and mariadb-server (a one-node SLURM cluster with job
# accounting); postgresql (the MLflow tracking server's backend store); graphviz (the summary's DAG picture) and
# chromium (the MLflow UI review test). The tests start and stop their own daemons.
SYSTEM_PACKAGES := softhsm2 slurm-wlm slurmdbd munge mariadb-server postgresql graphviz chromium
system:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

run: setup
	$(BIN)/snakemake

# Every tier: -m "" replaces the fast-tier selection that pyproject.toml's addopts make the default. Two pytest-xdist
# workers (the CI machine's 2 cores: a DAG's jobs leave a core idle much of the time); the tests of one shared DAG run
# stay on one worker (tests/conftest.py: SHARED_DAGS). The 15 slowest tests are listed at the end.
test: setup system
	$(BIN)/python -m pytest -ra -m "" -n 2 --durations=15

# The fast tier, what a bare `pytest` runs (pyproject.toml's addopts): no root, no Debian packages, no services,
# no DAG runs. Tests carry their tier as a marker (e2e, services, slow; declared in pyproject.toml).
test-fast: setup
	$(BIN)/python -m pytest -ra -n 2

lint: setup
	$(BIN)/snakemake --lint

# config/schema.yaml from the settings declared in workflow/config.py (a test checks it is current).
schema: setup
	$(BIN)/python -m workflow.config > config/schema.yaml

dag: setup
	$(BIN)/snakemake --dag | dot -Tsvg > dag.svg

clean:
	rm -rf results .snakemake
