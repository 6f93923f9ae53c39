"""Real services for the cluster tests, started in a temporary folder and stopped afterwards.

- SlurmCluster: a one-node SLURM cluster (Debian's slurm-wlm 22.05): munged, MariaDB, slurmdbd (so `sacct`
  has real job accounting), slurmctld and slurmd, on loopback ports of their own.
- MlflowServer: PostgreSQL (initdb/pg_ctl as the `postgres` user; it refuses root) and `mlflow server` with a
  PostgreSQL backend store and an artifact root in a folder, on loopback.

`make system` installs the Debian packages. Everything runs as separate processes found by their pid files;
stop() ends exactly those.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from workflow.finetune.launch import free_port
from workflow.wait import wait_for

MARIADB_PASSWORD = "slurmdbd-test"  # a throwaway database on loopback, gone when the test ends


def stop_pid_file(path: Path, timeout: float = 30.0) -> None:
    """SIGTERM the process named in a pid file and wait for it to go."""
    if not path.exists():
        return
    try:
        pid = int(path.read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
    except (ValueError, IndexError, ProcessLookupError):
        return
    try:
        wait_for(lambda: not _alive(pid), f"pid {pid} to exit", timeout, 0.2)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


class SlurmCluster:
    SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
    """Where SLURM clients look when SLURM_CONF is unset: the SLURM jobstep plugin strips SLURM_* variables from
    the `srun` it runs inside each job, so the test's config is linked here while the cluster runs."""

    def __init__(self, root: Path, account: str = "ft2prod", partition: str = "test") -> None:
        self.root, self.account, self.partition = root, account, partition
        self.node = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.ports = {name: free_port() for name in ("slurmctld", "slurmd", "slurmdbd", "mariadb")}

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=os.environ | self.env, capture_output=True, text=True, check=check, timeout=60)

    def start(self) -> None:
        if self.SYSTEM_CONF.exists() or self.SYSTEM_CONF.is_symlink():
            raise FileExistsError(f"{self.SYSTEM_CONF} exists: this machine has a SLURM setup of its own; not touching it")
        for sub in ("munge", "db", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._start_mariadb()
        self._start_slurmdbd()
        self._write_slurm_conf()
        self.SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        self.SYSTEM_CONF.symlink_to(self.conf)
        self.run("sacctmgr", "-i", "add", "cluster", "ft2prodtest")
        self.run("sacctmgr", "-i", "add", "account", self.account, "Description=ft2prod tests", "Organization=ft2prod")
        self.run("sacctmgr", "-i", "add", "user", "root", f"Account={self.account}", f"DefaultAccount={self.account}")
        self.run("slurmctld")
        self.run("slurmd")
        wait_for(lambda: "idle" in self.run("sinfo", "-h", "-o", "%t", check=False).stdout, "the node to be idle")

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        munge.chmod(0o711)  # clients must reach the socket; the key stays owner-only
        subprocess.run(["mungekey", "-c", "-k", str(munge / "munge.key")], check=True)
        subprocess.run(["munged", "--force", f"--socket={munge / 'munge.sock'}", f"--key-file={munge / 'munge.key'}",
                        f"--log-file={munge / 'munged.log'}", f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}"],
                       check=True)

    def _start_mariadb(self) -> None:
        db = self.root / "db"
        subprocess.run(["mariadb-install-db", "--no-defaults", "--user=root", f"--datadir={db}", "--auth-root-authentication-method=normal"],
                       check=True, capture_output=True)
        self.mariadb = subprocess.Popen(["mariadbd", "--no-defaults", "--user=root", f"--datadir={db}", f"--socket={db / 'mysql.sock'}",
                          "--bind-address=127.0.0.1", f"--port={self.ports['mariadb']}", f"--pid-file={db / 'mariadb.pid'}",
                          f"--log-error={self.root / 'log' / 'mariadb.log'}", "--skip-name-resolve", "--innodb-buffer-pool-size=32M"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        sql = (f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{MARIADB_PASSWORD}'; "
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")
        wait_for(lambda: subprocess.run(["mariadb", "--no-defaults", f"--socket={db / 'mysql.sock'}", "-uroot", "-e", sql],
                                        capture_output=True).returncode == 0, "MariaDB")

    def _start_slurmdbd(self) -> None:
        dbd = self.root / "slurmdbd.conf"  # slurmdbd reads it from beside SLURM_CONF; it must be owner-only
        dbd.write_text(f"""AuthType=auth/munge
AuthInfo=socket={self.root / 'munge' / 'munge.sock'}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={self.ports['slurmdbd']}
SlurmUser=root
PidFile={self.root / 'slurmdbd.pid'}
LogFile={self.root / 'log' / 'slurmdbd.log'}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.ports['mariadb']}
StorageUser=slurm
StoragePass={MARIADB_PASSWORD}
StorageLoc=slurm_acct_db
""")
        dbd.chmod(0o600)
        self.conf.write_text(f"ClusterName=ft2prodtest\nSlurmctldHost={self.node}(127.0.0.1)\n")  # for slurmdbd's lookup only
        self.run("slurmdbd")
        wait_for(lambda: _listening(self.ports["slurmdbd"]), "slurmdbd")

    def _write_slurm_conf(self) -> None:
        with open("/proc/meminfo") as handle:
            total_mb = int(next(line for line in handle if line.startswith("MemTotal")).split()[1]) // 1024
        munge_socket = self.root / "munge" / "munge.sock"
        self.conf.write_text(f"""# a one-node test cluster (tests/services.py)
ClusterName=ft2prodtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={self.ports['slurmctld']}
SlurmdPort={self.ports['slurmd']}
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={self.root / 'state'}
SlurmdSpoolDir={self.root / 'spool'}
SlurmctldPidFile={self.root / 'slurmctld.pid'}
SlurmdPidFile={self.root / 'slurmd.pid'}
SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}
SlurmdLogFile={self.root / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={self.ports['slurmdbd']}
AccountingStoragePass={munge_socket}
AccountingStoreFlags=job_comment
MinJobAge=600
KillWait=5
NodeName={self.node} NodeAddr=127.0.0.1 CPUs=2 RealMemory={int(total_mb * 0.9)} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def stop(self) -> None:
        if self.conf.exists() and (self.root / "slurmctld.pid").exists():
            self.run("scancel", f"--partition={self.partition}", check=False)
            self.run("scontrol", "shutdown", check=False)  # stops slurmd and slurmctld
        for pid_file in ("slurmd.pid", "slurmctld.pid", "slurmdbd.pid", "db/mariadb.pid", "munge/munged.pid"):
            stop_pid_file(self.root / pid_file)
        if getattr(self, "mariadb", None) is not None:
            self.mariadb.wait(30)
        if self.SYSTEM_CONF.is_symlink() and self.SYSTEM_CONF.readlink() == self.conf:
            self.SYSTEM_CONF.unlink()

    def sacct(self, *fields: str) -> list[dict[str, str]]:
        """Every job of the cluster, from accounting."""
        done = self.run("sacct", "-a", "-X", "--parsable2", "--noheader", f"--format={','.join(fields)}", "--starttime=now-1day")
        return [dict(zip(fields, line.split("|"))) for line in done.stdout.splitlines() if line]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class MlflowServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.pg_port, self.port = free_port(), free_port()
        self.pgdata: Path | None = None
        self.artifacts = root / "artifacts"
        self.server: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend_uri(self) -> str:
        return f"postgresql://mlflow:mlflow-test@127.0.0.1:{self.pg_port}/mlflow"

    def _as_postgres(self, *command: str, **kwargs) -> subprocess.CompletedProcess:
        bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]  # Debian's postgresql: the newest installed version
        return subprocess.run(["runuser", "-u", "postgres", "--", str(bindir / command[0]), *command[1:]], capture_output=True, text=True,
                              check=True, **kwargs)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # The postgres user cannot enter pytest's root-only folders: its data folder lives in /tmp, owner-only.
        self.pgdata = Path(tempfile.mkdtemp(prefix="ft2prod-pgdata-"))
        shutil.chown(self.pgdata, "postgres", "postgres")
        self._as_postgres("initdb", "-D", str(self.pgdata), "-A", "trust", "-U", "postgres")
        self._as_postgres("pg_ctl", "-D", str(self.pgdata), "-l", str(self.pgdata / "server.log"), "-w", "start",
                          "-o", f"-p {self.pg_port} -k {self.pgdata} -c listen_addresses=127.0.0.1")
        for sql in ("CREATE USER mlflow PASSWORD 'mlflow-test'", "CREATE DATABASE mlflow OWNER mlflow"):
            self._as_postgres("psql", "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres", "-c", sql)
        self.artifacts.mkdir()
        log = open(self.root / "mlflow-server.log", "w")
        # --workers 1: each worker holds the whole app (~1 GiB); one is plenty for a test.
        self.server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", self.backend_uri,
             "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_for(lambda: self.server.poll() is not None or _healthy(self.uri), "mlflow server", timeout=120)
        if self.server.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(self.root / 'mlflow-server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGTERM)  # its own session: the gunicorn/uvicorn workers too
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
        if self.pgdata is not None:
            if (self.pgdata / "postmaster.pid").exists():
                self._as_postgres("pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "stop")
            shutil.rmtree(self.pgdata)


def _healthy(uri: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
