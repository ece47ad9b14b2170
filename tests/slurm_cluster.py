"""A real single-node SLURM cluster for the tests (Debian's slurmctld, slurmd, slurm-client and munge, installed by
``bash run.sh test`` with apt-get where possible): a config written into a temporary folder (node = this host,
its CPUs, a bit less than its memory, daemons addressed as 127.0.0.1 on free ports), munged with its own key,
slurmctld and slurmd in the foreground as child processes of the test. On exit every job is cancelled and each
daemon is stopped by its pid, also when a test failed. Where the binaries are missing the tests skip with one
line saying why."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

# binary -> Debian package
BINARIES = {"munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client",
            "srun": "slurm-client", "squeue": "slurm-client", "scancel": "slurm-client", "scontrol": "slurm-client",
            "sinfo": "slurm-client"}
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
KILL_WAIT = 5  # seconds between SIGTERM and SIGKILL when a job is cancelled (SLURM's default: 30)
# jobs on this cluster run with the test's environment minus any SLURM variables of an enclosing allocation
FOREIGN_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")

SLURM_CONF = """\
# written by tests/slurm_cluster.py: one node, this host; no accounting database, no cgroups
ClusterName=pytest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge}/munge.socket
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU={mem_per_cpu}
# the node's CPUs and memory as written here, whatever the hardware detection says (a container)
SlurmdParameters=config_overrides
# a request the node can never satisfy is refused at submission instead of pending forever
EnforcePartLimits=ALL
KillWait={kill_wait}
# finished jobs leave slurmctld after 4 s (default 300): `sbatch --wait` then polls every 2 s instead of backing
# off to 8 and 32 s; the states of finished jobs are read from the job completion file below
MinJobAge=4
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={folder}/log/jobcomp.txt
MpiDefault=none
ReturnToService=2
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name, path=SEARCH_PATH) is None]


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return _free_ports(1)[0]


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return total_kb // 1024


@dataclass
class Cluster:
    folder: Path
    node: str
    cpus: int
    env: dict  # the environment of every SLURM command of the tests (SLURM_CONF of this cluster)

    def run(self, *cmd: str, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=kwargs.pop("env", self.env), capture_output=True, text=True, timeout=timeout,
                              **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-3000:]}\n{self.logs()}")
        return proc

    def popen(self, cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
        return subprocess.Popen(cmd, env=env or self.env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def job_state(self, job: str, timeout: float = 30) -> str:
        """The final state of a finished job (``123``, or ``123_4``: task 4 of the array job 123) as the job
        completion file records it: COMPLETED, CANCELLED, FAILED, ..."""
        deadline = time.monotonic() + timeout
        while True:
            for record in self.finished_jobs():
                if job in (record["JobId"], f"{record.get('ArrayJobId')}_{record.get('ArrayTaskId')}"):
                    return record["JobState"]
            if time.monotonic() > deadline:
                raise AssertionError(f"no completion record of job {job}:\n{self.logs()}")
            time.sleep(0.1)

    def finished_jobs(self) -> list[dict]:
        """The records of the job completion file (JobCompType=jobcomp/filetxt), one dict per finished job."""
        path = self.folder / "log" / "jobcomp.txt"
        lines = path.read_text().splitlines() if path.exists() else []
        return [dict(field.split("=", 1) for field in line.split() if "=" in field) for line in lines]

    def active_jobs(self) -> list[str]:
        """The jobs still pending, running or ending (array tasks as 123_4)."""
        out = self.run("squeue", "-h", "-t", "PD,R,CG,S,CF", "-o", "%i").stdout
        return out.split()

    def wait_until_ended(self, job: str, timeout: float = 120) -> str:
        """Wait until ``job`` has no pending, running or ending task; returns its final state (``job_state``)."""
        deadline = time.monotonic() + timeout

        def mine(active: str) -> bool:  # a task of the array job 123 shows as 123_4 or, pending, 123_[2-3]
            return active == job if "_" in job else active.split("_")[0] == job

        while any(map(mine, self.active_jobs())):
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} still active after {timeout} s:\n{self.logs()}")
            time.sleep(0.2)
        return self.job_state(job)

    def logs(self, lines: int = 30) -> str:
        parts = []
        for path in sorted((self.folder / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(parts)


def _stop(proc: subprocess.Popen) -> None:
    """Stop one daemon by its pid: SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def slurm_cluster(folder: Path) -> Iterator[Cluster]:
    """Start munged, slurmctld and slurmd for a one-node cluster configured in ``folder``; yields a ``Cluster``
    once the node is idle; on exit (also after an error) cancels every job and stops each daemon by its pid."""
    missing = missing_binaries()
    if missing:
        packages = sorted({BINARIES[name] for name in missing})
        message = (f"SLURM is not installed ({', '.join(missing)} missing; bash run.sh test installs the Debian "
                   f"packages {' '.join(packages)} where apt-get is allowed): the SLURM tests are skipped")
        if os.environ.get("REQUIRE_SYSTEM_TESTS") == "1":  # set by .ci/run: on CI's machine they must run
            pytest.fail(message)
        pytest.skip(message)
    binary = {name: shutil.which(name, path=SEARCH_PATH) for name in BINARIES}
    folder = Path(folder)
    for sub in ("state", "spool", "log"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    node = socket.gethostname().split(".")[0]  # hostname -s: the name slurmd and slurmctld take for this host
    cpus = len(os.sched_getaffinity(0))  # nproc
    memory = max(256, int(_memory_mb() * 0.9))
    ctld_port, slurmd_port = _free_ports(2)
    conf = folder / "slurm.conf"
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_PREFIXES)}
    env.update(SLURM_CONF=str(conf), PATH=SEARCH_PATH)
    cluster = Cluster(folder, node, cpus, env)
    with ExitStack() as stack:  # its callbacks run last-in, first-out
        # munged's socket folder: mode 755, and every folder above it must be enterable by all (munged refuses
        # anything less; pytest's temporary folders are 700): a folder of its own in the system's temporary folder
        munge = Path(tempfile.mkdtemp(prefix="pytest-munge-"))
        stack.callback(shutil.rmtree, munge, ignore_errors=True)
        munge.chmod(0o755)
        conf.write_text(SLURM_CONF.format(
            node=node, ctld_port=ctld_port, slurmd_port=slurmd_port, user=getpass.getuser(), folder=folder,
            munge=munge, mem_per_cpu=memory // cpus, kill_wait=KILL_WAIT, cpus=cpus, memory=memory))

        def start(name: str, *args: str) -> subprocess.Popen:
            out = stack.enter_context(open(folder / "log" / f"{name}.out", "w"))
            proc = subprocess.Popen([binary[name], *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
            stack.callback(_stop, proc)  # stopped in reverse order of start: slurmd, slurmctld, munged
            return proc

        munged = start("munged", "--foreground", f"--key-file={key}", f"--socket={munge / 'munge.socket'}",
                       f"--pid-file={munge / 'munged.pid'}", f"--seed-file={folder / 'munged.seed'}",
                       f"--log-file={folder / 'log' / 'munged.log'}")
        daemons = [munged]

        def running() -> None:
            for proc in daemons:
                if proc.poll() is not None:
                    raise RuntimeError(f"{Path(proc.args[0]).name} exited with status {proc.returncode}:\n"
                                       f"{cluster.logs()}")

        _wait_for(lambda: running() or (munge / "munge.socket").exists(), 10, "munged did not create its socket",
                  cluster)
        daemons += [start("slurmctld", "-D", "-f", str(conf)), start("slurmd", "-D", "-f", str(conf))]
        stack.callback(_cancel_all, cluster, daemons)  # every job cancelled before the daemons stop

        def idle() -> bool:
            running()
            state = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=30)
            return state.returncode == 0 and state.stdout.strip() == "idle"

        _wait_for(idle, 60, "the SLURM node did not become idle", cluster)
        yield cluster


def _cancel_all(cluster: Cluster, daemons: list[subprocess.Popen]) -> None:
    if any(proc.poll() is not None for proc in daemons):
        return
    cluster.run("scancel", "--user", getpass.getuser(), check=False, timeout=30)
    deadline = time.monotonic() + KILL_WAIT + 30
    while time.monotonic() < deadline:
        active = cluster.run("squeue", "-h", "-o", "%i", check=False, timeout=30)
        if active.returncode != 0 or not active.stdout.strip():
            return
        time.sleep(0.2)


def _wait_for(condition, timeout: float, message: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{message} within {timeout} s:\n{cluster.logs()}")
        time.sleep(0.1)
