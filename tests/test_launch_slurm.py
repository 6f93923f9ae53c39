"""The finetune launch inside SLURM allocations: the environment SLURM gives a batch script -> the command.

One node behaves as without SLURM; several nodes get one launcher per node through srun, meeting at the first
node. Host lists are expanded by the real `scontrol show hostnames` (Debian's slurm-wlm; no controller needed).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from workflow.config import FinetuneConfig
from workflow.finetune.launch import launch_command, slurm_hosts

pytestmark = [pytest.mark.services,  # scontrol (slurm-wlm)
              pytest.mark.skipif(shutil.which("scontrol") is None, reason="needs Debian's slurm-wlm (make system installs it)")]


def batch_env(tmp_path, nodelist: str, nodes: int) -> dict[str, str]:
    """What slurmd puts in a batch script's environment (the SLURM_* part, from a real 22.05 job), for a job
    of `nodes` nodes on `nodelist`; SLURM_CONF points at a config scontrol can read here."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=test\nSlurmctldHost=localhost\n")
    first = subprocess.run(["scontrol", "show", "hostnames", nodelist], env={"SLURM_CONF": str(conf)},
                           capture_output=True, text=True, check=True).stdout.split()[0]
    return {
        "PATH": "/usr/bin:/bin", "SLURM_CONF": str(conf), "SLURM_JOB_ID": "4242", "SLURM_JOBID": "4242",
        "SLURM_JOB_NAME": "0c5e7c2a-ft2prod", "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist,
        "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NNODES": str(nodes), "SLURM_NTASKS": str(nodes), "SLURM_NPROCS": str(nodes),
        "SLURM_CPUS_PER_TASK": "16", "SLURM_JOB_CPUS_PER_NODE": f"16(x{nodes})" if nodes > 1 else "16",
        "SLURM_TASKS_PER_NODE": f"1(x{nodes})" if nodes > 1 else "1", "SLURM_GPUS": str(8 * nodes), "SLURM_NODEID": "0",
        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURMD_NODENAME": first, "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_JOB_PARTITION": "gpu", "SLURM_JOB_ACCOUNT": "ml",
    }


def argv_on_node(command: list[str], node_id: int) -> list[str]:
    """The argv the per-node shell script really runs on node `node_id` (a real sh expands it)."""
    assert command[-3:-1] == ["sh", "-c"] and command[-1].startswith("exec ")
    script = "exec printf '%s\\n' " + command[-1][len("exec "):]
    done = subprocess.run(["sh", "-c", script], env={"SLURM_NODEID": str(node_id)}, capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_one_node_allocation_launches_as_without_slurm(tmp_path, launcher):
    cfg = FinetuneConfig(launcher=launcher, nproc_per_node=8)
    job = tmp_path / "job.json"
    inside = launch_command(cfg, job, batch_env(tmp_path, "gpu07", 1))
    outside = launch_command(cfg, job, {"PATH": "/usr/bin:/bin"})
    port = "--master_port"
    strip = lambda argv: [a for i, a in enumerate(argv) if not (a == port or (i and argv[i - 1] == port))]  # noqa: E731 - ports are free ones
    assert strip(inside) == strip(outside) and inside[0] == sys.executable
    assert not (tmp_path / "hostfile").exists()


def test_two_node_torchrun_runs_one_launcher_per_node_meeting_at_the_first(tmp_path):
    env = batch_env(tmp_path, "gpu[07-08]", 2)
    command = launch_command(FinetuneConfig(launcher="torchrun", nproc_per_node=8), tmp_path / "job.json", env)
    assert command[:6] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "sh"]
    for node in (0, 1):
        argv = argv_on_node(command, node)
        assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
        options = dict(zip(argv[3:13:2], argv[4:13:2]))
        assert options == {"--nnodes": "2", "--node_rank": str(node), "--nproc_per_node": "8", "--master_addr": "gpu07",
                           "--master_port": options["--master_port"]}
        assert argv[13:] == ["-m", "workflow.finetune.train", "--job", str(tmp_path / "job.json")]


def test_four_node_deepspeed_gets_a_hostfile_and_no_ssh(tmp_path):
    env = batch_env(tmp_path, "dgx-a[1,3],dgx-b[10-11]", 4)
    command = launch_command(FinetuneConfig(launcher="deepspeed", nproc_per_node=8), tmp_path / "job.json", env)
    assert command[1:3] == ["--nodes=4", "--ntasks=4"]
    assert (tmp_path / "hostfile").read_text() == "dgx-a1 slots=8\ndgx-a3 slots=8\ndgx-b10 slots=8\ndgx-b11 slots=8\n"
    argv = argv_on_node(command, 3)
    assert argv[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert argv[3:8] == ["--hostfile", str(tmp_path / "hostfile"), "--no_ssh", "--node_rank", "3"]
    assert argv[8:10] == ["--master_addr", "dgx-a1"] and argv[-4:] == ["--module", "workflow.finetune.train", "--job", str(tmp_path / "job.json")]
    # DeepSpeed's runner accepts exactly these arguments
    from deepspeed.launcher.runner import parse_args

    args = parse_args(argv[3:])
    assert (args.hostfile, args.no_ssh, args.node_rank, args.master_addr, args.module) == (str(tmp_path / "hostfile"), True, 3, "dgx-a1", True)


def test_missing_nodelist_and_bad_hostlist_are_clear_errors(tmp_path):
    env = batch_env(tmp_path, "gpu[07-08]", 2)
    del env["SLURM_JOB_NODELIST"], env["SLURM_NODELIST"]
    with pytest.raises(RuntimeError, match="SLURM_JOB_NUM_NODES > 1 but SLURM_JOB_NODELIST is not set"):
        slurm_hosts(env)
    (tmp_path / "empty.conf").write_text("")
    with pytest.raises(RuntimeError, match=r"(?s)`scontrol show hostnames gpu\[07-08\]` failed \(1\): .*ClusterName needs to be specified"):
        slurm_hosts(batch_env(tmp_path, "gpu[07-08]", 2) | {"SLURM_CONF": str(tmp_path / "empty.conf")})


@pytest.mark.e2e
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_node_command_trains_when_each_node_runs_its_part(tmp_path, tiny_base, tracking, launcher):
    """What srun does on each node, done here: the per-node script of a 2-node allocation runs twice on this
    machine (SLURM_NODEID 0 and 1, both "nodes" resolving to this host), one rank per node, over gloo."""
    import json

    from workflow.bootstrap.problems import generate_data
    from workflow.data import DataConfig, prepare_data
    from workflow.finetune.job import Job
    from workflow.finetune.launch import launch_env

    generate_data(str(tmp_path / "rows.jsonl"), 120, seed=0, tracking=tracking)
    prepare_data(tmp_path / "rows.jsonl", tiny_base, tmp_path / "data", DataConfig(test_fraction=0.1), tracking, seed=0)
    cfg = FinetuneConfig(launcher=launcher, nproc_per_node=1, zero_stage=2, max_steps=3, micro_batch_size=4, save_steps=3, logging_steps=1)
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    job = checkpoints / "job.json"
    job.write_text(Job(finetune=cfg, seed=0, model_dir=str(tiny_base), data_dir=str(tmp_path / "data"),
                       checkpoint_dir=str(checkpoints), summary=str(tmp_path / "summary.json"), fingerprint="test",
                       trained_from={}, resume_from=None).model_dump_json())
    command = launch_command(cfg, job, batch_env(tmp_path, "localhost,127.0.0.1", 2))
    env = {k: v for k, v in launch_env(cfg, "", "").items() if not k.startswith(("MLFLOW_", "SLURM_"))} | {"OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(["sh", "-c", command[-1]], env=env | {"SLURM_NODEID": str(node)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outputs = [node.communicate(timeout=400)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["global_step"] == 3
    assert (checkpoints / "checkpoint-3" / ".complete").exists()
    # one ZeRO-2 optimizer partition per rank: the two "nodes" formed one world of 2
    assert len(list((checkpoints / "checkpoint-3").rglob("*zero_pp_rank_*_optim_states.pt"))) == 2
