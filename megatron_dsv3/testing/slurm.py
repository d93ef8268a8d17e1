"""A real Slurm cluster on this machine, for tests: munge, slurmctld and two slurmd "nodes" on localhost.

It installs nothing (``apt-get install -y slurm-wlm munge`` as root does: see the README and
``.ci/run``) and touches nothing outside its folder: its own munge key and socket, its own
``slurm.conf`` (free ports, state and logs in the folder), daemons started in the foreground and
stopped by pid.  Both nodes are ``localhost`` (``slurmd -N``), two CPUs each; a requeued job may
start again after 10 s (``cred_expire=10``); a stopped job has 120 s to save (``KillWait``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from megatron_dsv3.train.processes import free_port

NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
INSTALL = "apt-get install -y slurm-wlm munge (as root; the README's cluster section)"
NODES = ("dsv3n1", "dsv3n2")


def missing() -> str | None:
    """Why a local Slurm cannot start here (None: it can)."""
    absent = [name for name in NEEDED if shutil.which(name) is None]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} not found); install it with: {INSTALL}"
    if os.geteuid() != 0:
        return "the local Slurm runs its daemons as root (slurmd starts jobs as any user); run the slurm tests as root"
    return None


class LocalSlurm:
    """Start with :meth:`start`, stop with :meth:`stop` (every daemon it started, by pid)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.conf = self.folder / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._daemons: list[tuple[str, subprocess.Popen]] = []

    # ---- daemons ----
    def start(self, timeout: float = 60) -> "LocalSlurm":
        for sub in ("munge", "state", "log", *[f"spool/{n}" for n in NODES]):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        (self.folder / "munge").chmod(0o711)
        key = self.folder / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket = self.folder / "munge" / "munge.sock"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={socket}", f"--key-file={key}",
                               f"--log-file={self.folder / 'log/munged.log'}", f"--pid-file={self.folder / 'munge/pid'}",
                               f"--seed-file={self.folder / 'munge/seed'}"])
        _wait_for(lambda: socket.exists(), timeout, "munged's socket", self.folder / "log")
        ports = [free_port() for _ in range(1 + len(NODES))]
        self.conf.write_text(_slurm_conf(self.folder, socket, ports))
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        time.sleep(1)
        for node in NODES:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-f", str(self.conf), "-N", node])
        _wait_for(self._nodes_idle, timeout, "both nodes idle in sinfo", self.folder / "log")
        return self

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.folder / "log" / f"{name}.out", "w")
        self._daemons.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env)))

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "--noheader", "-N", "-o", "%N %t", check=False).stdout.split()
        return out.count("idle") == len(NODES)

    def stop(self) -> None:
        """Cancel every job, wait for them to end, then stop the daemons (newest first), by pid."""
        if any(name == "slurmctld" and p.poll() is None for name, p in self._daemons):
            self.run("scancel", "--full", "--user", "root", check=False)
            _wait_for(lambda: not self.run("squeue", "--noheader", check=False).stdout.strip(), 150,
                      "the jobs to end", None, fail=False)
        for _, process in reversed(self._daemons):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self._daemons.clear()

    # ---- jobs ----
    def run(self, *command: str, check: bool = True, cwd=None) -> subprocess.CompletedProcess:
        result = subprocess.run(list(command), capture_output=True, text=True, env=self.env, cwd=cwd, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stdout}{result.stderr}")
        return result

    def submit(self, script: Path, env: dict | None = None) -> str:
        """``sbatch`` from the script's folder (the job's working folder); the job id."""
        result = subprocess.run(["sbatch", "--parsable", script.name], capture_output=True, text=True,
                                cwd=script.parent, env={**self.env, **(env or {})}, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed: {result.stderr}")
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", job_id, "--oneliner").stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait(self, job_id: str, timeout: float, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")) -> dict:
        _wait_for(lambda: self.job(job_id)["JobState"] in until, timeout, f"job {job_id} to reach {until}",
                  self.folder / "log")
        return self.job(job_id)


def _slurm_conf(folder: Path, munge_socket: Path, ports: list[int]) -> str:
    nodes = "\n".join(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs=2"
                      f" RealMemory=4000 State=UNKNOWN" for name, port in zip(NODES, ports[1:]))
    return f"""ClusterName=megatron-dsv3-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ports[0]}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=120
MpiDefault=none
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def _wait_for(condition, timeout: float, what: str, logs: Path | None, *, fail: bool = True) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if condition():
                return True
        except (RuntimeError, KeyError, subprocess.TimeoutExpired):
            pass
        time.sleep(1)
    if not fail:
        return False
    tails = ""
    if logs is not None and logs.is_dir():
        for path in sorted(logs.iterdir()):
            tails += f"\n--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:])
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{tails}")
