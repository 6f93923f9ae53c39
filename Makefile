# ft2prod: `make run` sets up and runs the whole DAG on the embedded default; `make test` sets up and tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system run test lint dag clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@echo "installing pinned dependencies into $(VENV) (log: $(VENV)/pip.log)"
	$(BIN)/python -m pip install -r requirements.txt -c requirements.lock > $(VENV)/pip.log 2>&1 || (tail -30 $(VENV)/pip.log; exit 1)
	$(BIN)/python -m pip install --no-deps -e . >> $(VENV)/pip.log 2>&1
	touch $@

# Debian packages the tests use for real: SoftHSM2 (a PKCS#11 HSM); graphviz (the summary's DAG picture) and
# chromium (the MLflow UI review test). Each is installed only when missing. Needs root, as on CI.
system:
	@command -v softhsm2-util >/dev/null || (apt-get update -qq && apt-get install -y -qq softhsm2 >/dev/null)
	@(command -v dot && command -v chromium) >/dev/null || (apt-get update -qq && apt-get install -y -qq graphviz chromium >/dev/null)

run: setup
	$(BIN)/snakemake

test: setup system
	$(BIN)/python -m pytest -ra

lint: setup
	$(BIN)/snakemake --lint

dag: setup
	$(BIN)/snakemake --dag | dot -Tsvg > dag.svg

clean:
	rm -rf results .snakemake
