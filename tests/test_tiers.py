"""Test tiers are markers on the tests (pyproject.toml declares them and makes the fast tier the default); a test
that runs snakemake without the e2e marker stops collection. Checked on small test files run by pytester in-process
with this suite's conftest.py and pyproject.toml settings."""

from __future__ import annotations

import shlex
import tomllib

import pytest
from conftest import REPO

pytest_plugins = ["pytester"]

SETTINGS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
TESTS = '''
import pytest

def test_unit():
    pass

@pytest.mark.e2e
def test_dag(snakemake):
    pass

@pytest.mark.slow
def test_slow():
    pass

@pytest.mark.services
def test_daemon():
    pass
'''


@pytest.fixture
def suite(pytester):
    pytester.makeconftest((REPO / "tests" / "conftest.py").read_text())
    addopts = SETTINGS["addopts"] if isinstance(SETTINGS["addopts"], str) else shlex.join(SETTINGS["addopts"])
    pytester.makeini(f"[pytest]\naddopts = {addopts}"
                     + "\nmarkers =\n" + "".join(f"    {marker}\n" for marker in SETTINGS["markers"]))
    return pytester


def test_a_bare_pytest_runs_the_fast_tier_and_an_empty_marker_expression_runs_all(suite):
    suite.makepyfile(test_sample=TESTS)
    suite.runpytest("--collect-only", "-q").assert_outcomes(deselected=3)
    collected = suite.runpytest("--collect-only", "-q", "-m", "")
    assert collected.ret == 0 and "deselected" not in collected.stdout.str()
    assert sum("::test_" in line for line in collected.stdout.lines) == 4


def test_a_test_that_runs_snakemake_unmarked_stops_collection(suite):
    suite.makepyfile(test_sample=TESTS + '''
import pytest

@pytest.fixture
def dag_run(snakemake):  # a fixture that runs the DAG: its tests run it too
    return snakemake

def test_forgot_the_marker(dag_run):
    pass
''')
    for marker in ("not e2e and not services and not slow", ""):  # the fast tier would deselect it: still an error
        done = suite.runpytest("--collect-only", "-q", "-m", marker)
        assert done.ret == pytest.ExitCode.USAGE_ERROR
        assert "not marked e2e" in done.stderr.str() and "test_sample.py::test_forgot_the_marker" in done.stderr.str()
        assert "test_dag" not in done.stderr.str()


def test_an_undeclared_marker_is_an_error(suite):
    suite.makepyfile(test_sample="import pytest\n\n@pytest.mark.e2ee\ndef test_typo():\n    pass\n")
    assert suite.runpytest("--collect-only", "-q").ret == pytest.ExitCode.INTERRUPTED
