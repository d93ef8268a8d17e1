"""``megatron-dsv3 slurm`` on a real Slurm (munge, slurmctld, two slurmd nodes on this machine).

Run with ``pytest -m slurm`` after ``apt-get install -y slurm-wlm munge`` (root; ``.ci/run`` does
both).  The scripts are written by the command users type and submitted with ``sbatch``; the
recipe is ``dsv3-tiny-cpu`` on 2 nodes x 1 process, with a short schedule.  Job A trains
uninterrupted.  Job B is stopped twice: first as the time limit would stop it (the batch shell's
``SIGUSR1``: Megatron saves, the script requeues the job), then as a preemption does (``scontrol
requeue``: Slurm's ``SIGTERM``, Megatron saves, Slurm requeues); each try resumes from the
checkpoint, and its losses equal job A's.  Job C is submitted on fewer nodes than its script is
written for and is refused before training.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_dsv3.testing.slurm import LocalSlurm, missing

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
STEPS = 16  # the second stop must land while training runs: 14 steps of margin
OVERRIDES = [
    f"training.train_iters={STEPS}", "training.lr_warmup_iters=1", "parallel.world_size=2",
    "training.micro_batch_size=2", "training.global_batch_size=4", "model.seq_length=64",
    "training.eval_iters=1", f"checkpoint.save_interval={STEPS}",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = missing()
    if why:
        pytest.fail(why)
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        yield slurm.start()
    finally:
        slurm.stop()


def _script(folder: Path) -> Path:
    """``megatron-dsv3 slurm`` writes ``job.sbatch`` for a run in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    run = folder / "run"
    command = [sys.executable, "-m", "megatron_dsv3.cli", "slurm", "dsv3-tiny-cpu", *OVERRIDES,
               f"checkpoint.save={run}", f"checkpoint.load={run}", "--nodes", "2", "-o", str(folder / "job.sbatch")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=folder, timeout=120,
                            env={**_env(), "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    return folder / "job.sbatch"


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _records(folder: Path) -> list[dict]:
    path = folder / "run" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _log(folder: Path, job_id: str) -> str:
    return next(folder.glob(f"*-{job_id}.out")).read_text()


def _wait_for_step(folder: Path, step: int, job_id: str, cluster, timeout: float = 900) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(r["iteration"] >= step for r in _records(folder)):
            return
        # COMPLETING and CONFIGURING come between the tries of a requeued job.
        assert cluster.job(job_id)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED"), \
            _log(folder, job_id)[-3000:]
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not reach step {step}")


def _saved_step(folder: Path, timeout: float = 600) -> int:
    tracker = folder / "run" / "latest_checkpointed_iteration.txt"
    end = time.monotonic() + timeout
    while not tracker.exists():
        assert time.monotonic() < end, "no checkpoint was saved after the signal"
        time.sleep(0.5)
    return int(tracker.read_text())


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("jobs")
    a, b, c = base / "uninterrupted", base / "preempted", base / "refused"
    ids = {"a": cluster.submit(_script(a), _env()), "b": cluster.submit(_script(b), _env())}
    script_c = _script(c)
    result = subprocess.run(["sbatch", "--parsable", "--nodes=1", script_c.name], capture_output=True, text=True,
                            cwd=c, env={**cluster.env, **_env()}, timeout=60)
    ids["c"] = result.stdout.strip()
    # Job B: the time-limit warning after step 2 (Megatron saves, the script requeues) ...
    _wait_for_step(b, 2, ids["b"], cluster)
    cluster.run("scancel", "--signal=USR1", "--batch", ids["b"])
    saved = _saved_step(b)
    # ... then, a step into the next try, a preemption (Slurm's SIGTERM, Megatron saves, Slurm requeues).
    _wait_for_step(b, saved + 1, ids["b"], cluster)
    cluster.run("scontrol", "requeue", ids["b"])
    states = {name: cluster.wait(job_id, timeout=1500) for name, job_id in ids.items()}
    return {"folders": {"a": a, "b": b, "c": c}, "ids": ids, "states": states}


def test_a_generated_job_trains_on_two_slurm_nodes(jobs):
    a, job = jobs["folders"]["a"], jobs["states"]["a"]
    log = _log(a, jobs["ids"]["a"])
    assert job["JobState"] == "COMPLETED", log[-3000:]
    assert "world size 2" in log and "result     OK" in log  # the check on the job's own machine
    assert f"[megatron-dsv3] step {STEPS}/{STEPS}" in log
    assert sorted(r["iteration"] for r in _records(a)) == list(range(1, STEPS + 1))
    assert (a / "run" / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)


def test_a_job_stopped_for_its_time_limit_and_preempted_resumes_to_the_uninterrupted_losses(jobs):
    b, job = jobs["folders"]["b"], jobs["states"]["b"]
    log = _log(b, jobs["ids"]["b"])
    assert job["JobState"] == "COMPLETED", log[-3000:]
    assert job["Restarts"] == "2", log[-3000:]
    assert "the time limit is" in log and "requeued: the next try resumes" in log
    assert "Slurm is stopping the job" in log
    # Megatron's save-and-exit, both times (not the end of the schedule before the preemption came).
    assert log.count("exiting program after receiving SIGTERM") == 2, log[-3000:]
    reference = {r["iteration"]: r["lm_loss"] for r in _records(jobs["folders"]["a"])}
    records = _records(b)
    iterations = [r["iteration"] for r in records]
    assert iterations == list(range(1, STEPS + 1)), iterations  # each try went on from the last one's step
    assert {r["iteration"]: r["lm_loss"] for r in records} == reference


def test_a_job_given_fewer_nodes_than_its_script_is_refused_before_training(jobs):
    c, job = jobs["folders"]["c"], jobs["states"]["c"]
    log = _log(c, jobs["ids"]["c"])
    assert job["JobState"] == "FAILED", log[-3000:]
    assert "the job has 1 node(s) but its script is written for 2" in log
    assert "Fix:" in log and "refused before training" in log
    assert not (c / "run" / "metrics.jsonl").exists()


def _workers() -> list[int]:
    """The training workers on this machine (torchrun's children, not torchrun or srun)."""
    table = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [int(line.split()[0]) for line in table
            if "megatron_dsv3.cli train" in line and "torch.distributed.run" not in line and "srun" not in line]


def test_a_crashed_worker_fails_the_job_instead_of_hanging_it(jobs, cluster, tmp_path):
    """A worker killed mid-run (as the OOM killer would) ends the whole job, FAILED, within torchrun's
    shutdown grace: the other node's worker, blocked in a collective, is stopped rather than waiting."""
    d = tmp_path / "crashed"
    job_id = cluster.submit(_script(d), _env())
    _wait_for_step(d, 2, job_id, cluster)
    workers = _workers()
    assert workers, "no training worker found"
    subprocess.run(["kill", "-KILL", str(workers[0])], check=True)
    job = cluster.wait(job_id, timeout=400)
    log = _log(d, job_id)
    assert job["JobState"] == "FAILED", log[-3000:]
    assert "training ended (exit" in log and f"[megatron-dsv3] step {STEPS}/{STEPS}" not in log
    # A worker follows its torchrun (parent-death signal); its data-loader processes follow it within seconds.
    end = time.monotonic() + 30
    while _workers() and time.monotonic() < end:
        time.sleep(1)
    assert not _workers(), "a worker outlived its job"
