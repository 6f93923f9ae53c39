"""The workflow submitted to a live SLURM cluster through profiles/slurm: a one-node cluster on this machine
(munged, MariaDB + slurmdbd for accounting, slurmctld, slurmd; tests/services.py), the tiny DAG up to the
exported model, a job killed with scancel, the rerun, and the outputs compared with a local run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY, merge
from services import SlurmCluster, wait_for
from workflow.tracking import sha256_file

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.services,
    pytest.mark.skipif(not all(shutil.which(t) for t in ("slurmctld", "slurmdbd", "munged", "mariadbd")),
                       reason="needs Debian's slurm-wlm, slurmdbd, munge and mariadb-server (make system installs them)"),
]

TARGET = "results/model"  # bootstrap, generate_data, prepare_data, finetune (2 ranks), export; plan runs locally
JOBS = {"bootstrap", "generate_data", "prepare_data", "finetune", "export"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        try:
            cluster.start()
        except FileExistsError as err:
            pytest.skip(str(err))
        yield cluster
    finally:
        cluster.stop()


def slurm_profile(cluster, path: Path) -> Path:
    """profiles/slurm as shipped, with this cluster's account and partition and quicker status polls; the
    large-model overrides are dropped (the rules' own sizes fit the tiny config)."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    profile.pop("set-resources")
    profile["default-resources"] |= {"slurm_account": cluster.account, "slurm_partition": cluster.partition}
    profile |= {"slurm-init-seconds-before-status-checks": 2, "latency-wait": 5}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(profile))
    return path




def submit(cluster, workdir: Path, profile: Path) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(merge(TINY, {})))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SLURM_"))} | cluster.env
    return subprocess.Popen(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile", "config.yaml", "--profile", str(profile), TARGET],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def running_finetune(cluster) -> str | None:
    """The SLURM job id of the running finetune job (squeue: %i id, %k comment, %T state)."""
    for line in cluster.run("squeue", "-h", "-o", "%i|%k|%T").stdout.splitlines():
        job, comment, state = line.split("|")
        if comment == "rule_finetune" and state == "RUNNING":
            return job
    return None


def digests(workdir: Path) -> dict:
    results = workdir / "results"
    model = json.loads((results / "model" / "ft2prod.json").read_text())
    return {
        "data": {name: sha256_file(results / "data" / name) for name in ("train.jsonl", "val.jsonl", "test.jsonl", "stats.json")},
        "model_config": json.loads((results / "model" / "config.json").read_text()),
        "global_step": model["global_step"],
        "weights": sha256_file(results / "model" / "model.safetensors"),
    }


def test_workflow_on_slurm_equals_local_and_a_cancelled_job_is_reported_and_rerun(cluster, tmp_path, snakemake):
    # The local reference runs while the SLURM runs mostly wait on the controller's status polls (CI time).
    local = tmp_path / "local"
    reference = ThreadPoolExecutor(1).submit(snakemake, local, {}, TARGET)

    workdir, profile = tmp_path / "slurm", slurm_profile(cluster, tmp_path / "profile")
    first = submit(cluster, workdir, profile)
    try:
        job = wait_for(lambda: running_finetune(cluster) or (first.poll() is not None and "exited"), "the finetune job to run", timeout=300, every=1)
        assert job != "exited", first.communicate()[0][-5000:]
        log = workdir / "results" / "logs" / "finetune.log"
        wait_for(lambda: log.exists() and "launching:" in log.read_text(), "the finetune launch", timeout=120)
        time.sleep(5)  # let the ranks start training
        cluster.run("scancel", job)
        out = first.communicate(timeout=180)[0]
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode != 0, out
    assert f"SLURM-job '{job}' failed, SLURM status is: 'CANCELLED'" in out, out[-3000:]
    assert "Error in rule finetune" in out, out[-3000:]
    states = {j["JobIDRaw"]: j["State"] for j in cluster.sacct("JobIDRaw", "State")}
    assert states[job].startswith("CANCELLED")

    second = submit(cluster, workdir, profile)
    out = second.communicate(timeout=900)[0]
    assert second.returncode == 0, out[-5000:]

    jobs = cluster.sacct("JobIDRaw", "JobName", "Account", "Partition", "Comment", "State", "ExitCode", "AllocCPUS", "ReqMem")
    by_rule: dict[str, list[dict]] = {}
    for j in jobs:
        by_rule.setdefault(j["Comment"].removeprefix("rule_"), []).append(j)
    assert set(by_rule) == JOBS, jobs  # plan is a local rule: never queued
    assert [j["State"] for j in by_rule["finetune"]][-1] == "COMPLETED" and by_rule["finetune"][0]["State"].startswith("CANCELLED")
    assert all(j["State"] == "COMPLETED" for rule in JOBS - {"finetune"} for j in by_rule[rule])
    assert all(j["Account"] == "ft2prod" and j["Partition"] == "test" for j in jobs)
    # the rule's resources became the request: finetune threads 2 -> 2 CPUs, mem_mb 4000 -> 4000M (plus the plugin's small fudge)
    finetune = by_rule["finetune"][-1]
    assert finetune["AllocCPUS"] == "2" and finetune["ReqMem"].startswith("4")

    assert (workdir / "results" / "finetune" / "checkpoints" / "job.json").exists()  # kept across the cancel: resumable

    reference.result(timeout=900)
    ours, theirs = digests(workdir), digests(local)
    assert ours["data"] == theirs["data"] and ours["model_config"] == theirs["model_config"] and ours["global_step"] == theirs["global_step"] == 8
    assert ours["weights"] == theirs["weights"], "training on 2 CPU ranks is deterministic here, resumed or not"
