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


def test_the_tests_of_one_shared_dag_run_on_one_worker(suite):
    """Under `make test`'s two xdist workers, every test that reads a shared DAG run lands on the same worker (the DAG
    runs once); the others spread over both. A test reading one from another module stops collection."""
    fixtures = "import time\nimport pytest\n\n@pytest.fixture\ndef zero2():\n    return 'dag'\n\n@pytest.fixture\ndef r1_run():\n    return 'dag'\n"
    reads = lambda name: "".join(f"\ndef test_reads_{name}_{i}({name}):\n    time.sleep(0.3)\n" for i in range(3))  # noqa: E731
    suite.makeconftest((REPO / "tests" / "conftest.py").read_text() + "\n" + fixtures)
    suite.makepyfile(test_workflow="import time\n" + reads("zero2"), test_review_ui="import time\n" + reads("zero2").replace("_reads_", "_ui_reads_"),
                     test_readme_r1="import time\n" + reads("r1_run"),
                     test_units="import time\n" + "".join(f"\ndef test_unit_{i}():\n    time.sleep(0.3)\n" for i in range(6)))
    done = suite.runpytest("-n", "2", "-v", "-p", "xdist")
    done.assert_outcomes(passed=15)
    workers = {line.split("::")[1].split()[0]: line.split()[0] for line in done.stdout.lines if line.startswith("[gw") and "PASSED" in line}
    assert len({worker for test, worker in workers.items() if "reads_zero2" in test}) == 1, workers
    assert len({worker for test, worker in workers.items() if "reads_r1_run" in test}) == 1, workers
    assert len(set(workers.values())) == 2, workers

    suite.makepyfile(test_other="def test_astray(zero2):\n    pass\n")
    astray = suite.runpytest("--collect-only", "-q")
    assert astray.ret == pytest.ExitCode.USAGE_ERROR and "test_other.py::test_astray" in astray.stderr.str()
