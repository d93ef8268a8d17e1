"""``megatron-dsv3 train`` end to end on CPU: Megatron's own loop, the embedded corpus, checkpoints.

Each run is a real subprocess of the command users type.  The README's two commands are run as
written (the default recipe and checkpoint folder, in a fresh working directory), with fewer steps
than its 200 through the same code path: the recipe's warmup of 20 steps and a decay length that
follows ``train_iters``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIRST, LONGER = 24, 30  # the README's 200 and 400 steps, shorter
# The default recipe's schedule (recipes/dsv3-tiny-cpu.yaml), as docs/quickstart.md describes it.
LR, MIN_LR, WARMUP, BATCH = 3.0e-3, 3.0e-4, 20, 16


def _megatron_dsv3(cwd: Path, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """``megatron-dsv3 ARGS`` run in ``cwd``, as a user types it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "megatron_dsv3.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _train(run_dir: Path, *overrides: str, nproc: int = 1, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """A short run of its own in ``run_dir`` (a warmup of 2 steps, so that a few steps decay)."""
    command = [
        "train", *overrides, f"checkpoint.save={run_dir}", f"checkpoint.load={run_dir}", "training.lr_warmup_iters=2",
        "--nproc", str(nproc),
    ]
    if extra:
        command += ["--", *extra]
    return _ok(_megatron_dsv3(REPO, *command))


def _records(run_dir: Path) -> dict[int, dict]:
    return {r["iteration"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _losses(run_dir: Path) -> dict[int, float]:
    return {step: r["lm_loss"] for step, r in _records(run_dir).items()}


def _cosine_lr(samples: int, warmup: int, decay: int) -> float:
    """The rate after ``samples`` sequences: linear warmup, then cosine to min_lr (float64, by hand)."""
    if samples <= warmup:
        return LR * samples / warmup
    if samples >= decay:
        return MIN_LR
    return MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * (samples - warmup) / (decay - warmup)))


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """``megatron-dsv3 train training.train_iters=24`` in a fresh directory: runs/dsv3-tiny."""
    cwd = tmp_path_factory.mktemp("readme")
    result = _ok(_megatron_dsv3(cwd, "train", f"training.train_iters={FIRST}"))
    return cwd, result


def _copy_of(readme_run, tmp_path: Path) -> Path:
    """A working directory holding a copy of the README run's folder (runs/dsv3-tiny)."""
    shutil.copytree(readme_run[0] / "runs", tmp_path / "runs")
    (tmp_path / "runs" / "dsv3-tiny" / "metrics.jsonl").unlink()
    return tmp_path


@pytest.fixture(scope="module")
def extended(readme_run, tmp_path_factory):
    """The README's second command: the same command with more steps, on the same folder."""
    cwd = _copy_of(readme_run, tmp_path_factory.mktemp("extended"))
    return cwd, _ok(_megatron_dsv3(cwd, "train", f"training.train_iters={LONGER}"))


def test_train_shows_progress_and_the_loss_falls(readme_run):
    cwd, result = readme_run
    assert f"[megatron-dsv3] step {FIRST}/{FIRST} | loss" in result.stdout
    assert "tokens/s" in result.stdout and "ETA" in result.stdout
    losses = _losses(cwd / "runs" / "dsv3-tiny")
    assert sorted(losses) == list(range(1, FIRST + 1))
    assert losses[FIRST] < losses[1] - 1.0, losses  # from ~8.3 (ln 4096) down


def test_train_writes_a_checkpoint_and_a_second_run_has_nothing_left_to_do(readme_run):
    cwd, result = readme_run
    run_dir = cwd / "runs" / "dsv3-tiny"
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == str(FIRST)
    assert (run_dir / f"iter_{FIRST:07d}").is_dir()
    assert "training.train_iters=N to continue from it" in result.stdout
    again = _ok(_megatron_dsv3(cwd, "train", f"training.train_iters={FIRST}"))
    assert "nothing to do" in again.stdout


def test_resumed_run_reproduces_the_uninterrupted_losses(readme_run, tmp_path):
    reference = _losses(readme_run[0] / "runs" / "dsv3-tiny")
    # Stop after step 12 (Megatron's --exit-interval: the same schedule), then resume to 24.
    folder = [f"checkpoint.save={tmp_path}", f"checkpoint.load={tmp_path}", "checkpoint.save_interval=12",
              f"training.train_iters={FIRST}"]
    _ok(_megatron_dsv3(REPO, "train", *folder, "--", "--exit-interval", "12"))
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "12"
    resumed = _ok(_megatron_dsv3(REPO, "train", *folder))
    assert "resuming from step 12" in resumed.stdout and "LR schedule" not in resumed.stdout
    losses = _losses(tmp_path)  # the metrics file keeps both runs
    for step in range(1, FIRST + 1):
        assert losses[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-6), step


def test_the_readmes_longer_second_run_resumes_at_the_next_step_on_the_longer_schedule(extended):
    cwd, result = extended
    run_dir = cwd / "runs" / "dsv3-tiny"
    assert f"resuming from step {FIRST}" in result.stdout
    # Megatron's scheduler counts samples: decay = train_iters x 16, warmup = 20 x 16.
    old, new = FIRST * BATCH, LONGER * BATCH
    line = re.search(r"\[megatron-dsv3\] LR schedule: the recipe's .*", result.stdout)
    assert line, result.stdout
    assert (f"the recipe's (decay {new} samples = {LONGER} steps of 16, warmup 320 = 20) replaces the checkpoint's"
            f" (decay {old} samples = {FIRST} steps of 16, warmup 320 = 20)") in line[0]
    rates = re.search(rf"the LR of step {FIRST + 1} is ([0-9.e-]+) \(the checkpoint's schedule: ([0-9.e-]+)\)", line[0])
    assert float(rates[1]) == pytest.approx(_cosine_lr(old, WARMUP * BATCH, new), rel=1e-2)
    assert float(rates[2]) == pytest.approx(MIN_LR, rel=1e-2)  # the old decay ended at step 24
    assert f"its decay to min_lr 0.0003 ends with step {LONGER}" in line[0]
    assert line.start() < result.stdout.index(f"step {FIRST + 1}/{LONGER}")  # said before training
    records = _records(run_dir)
    assert sorted(records) == list(range(FIRST + 1, LONGER + 1))  # steps 25-30, nothing repeated
    for step, record in records.items():  # the rate set after each step, on the longer schedule
        assert record["learning_rate"] == pytest.approx(_cosine_lr(step * BATCH, WARMUP * BATCH, new), rel=1e-9)
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == str(LONGER)


def test_check_says_what_resuming_a_run_will_do(readme_run, capsys):
    from megatron_dsv3.cli import main

    run_dir = readme_run[0] / "runs" / "dsv3-tiny"
    code = main(["check", "dsv3-tiny-cpu", f"checkpoint.load={run_dir}", f"training.train_iters={LONGER}",
                 "parallel.pp=2", "--world-size", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"resume     resumes {run_dir} at step {FIRST + 1} ({FIRST * BATCH} samples consumed by step {FIRST})" in out
    assert f"LR schedule: the recipe's (decay {LONGER * BATCH} samples" in out
    assert "layout PP 1 -> 2, schedule none -> 1F1B: Megatron's distributed checkpoint reshards" in out


def test_keeping_the_checkpoints_schedule_is_said_with_the_rate_it_gives(readme_run):
    from megatron_dsv3.args.compose import recipe_argv
    from megatron_dsv3.recipe import load_recipe
    from megatron_dsv3.train.resume import plan_resume

    run_dir = readme_run[0] / "runs" / "dsv3-tiny"
    recipe = load_recipe("dsv3-tiny-cpu", [f"checkpoint.load={run_dir}", f"training.train_iters={LONGER}",
                                           "checkpoint.use_checkpoint_opt_param_scheduler=true"])
    argv = recipe_argv(recipe, 1)
    assert "--use-checkpoint-opt_param-scheduler" in argv and "--override-opt_param-scheduler" not in argv
    line = plan_resume(recipe, argv, 1, FIRST).schedule_line()
    assert f"the checkpoint's (decay {FIRST * BATCH} samples = {FIRST} steps of 16, warmup 320 = 20) is kept" in line
    assert f"the LR of step {FIRST + 1} is 0.0003" in line
    assert f"its decay is over: steps {FIRST + 1}-{LONGER} train at min_lr 0.0003" in line


@pytest.mark.parametrize("change, words", [
    (["parallel.ep=2", "--nproc", "2"], ["saved under EP 1", "EP 2", "parallel.ep=1", "-- --finetune"]),
    (["model.num_layers=6"], ["another model", "num_layers 4 (checkpoint) vs 6 (recipe)", "its own folder"]),
], ids=["ep-1-to-2", "another-model"])
def test_a_resume_megatron_cannot_load_is_refused_before_training_with_the_fix(readme_run, tmp_path, change, words):
    cwd = _copy_of(readme_run, tmp_path)
    result = _megatron_dsv3(cwd, "train", f"training.train_iters={LONGER}", *change, timeout=600)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Fix:" in result.stderr and "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in result.stderr, result.stderr
    assert "[megatron-dsv3] training" not in result.stdout  # no worker started


@pytest.fixture(scope="module")
def expert_parallel_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ep2")
    result = _train(run_dir, "training.train_iters=4", "checkpoint.save_interval=4", "parallel.ep=2", nproc=2)
    return run_dir, result


def test_two_processes_with_expert_parallelism_train(expert_parallel_run):
    run_dir, result = expert_parallel_run
    assert "with 2 process(es) (EP 2)" in result.stdout
    losses = _losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses[4] < losses[1]


def test_an_expert_parallel_checkpoint_is_refused_under_ep_1_with_the_fix(expert_parallel_run):
    run_dir, _ = expert_parallel_run
    result = _megatron_dsv3(REPO, "train", "training.train_iters=6", f"checkpoint.save={run_dir}",
                            f"checkpoint.load={run_dir}", "checkpoint.save_interval=6", "training.lr_warmup_iters=2")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "saved under EP 2" in result.stderr and "parallel.ep=2" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.slow
def test_the_longer_second_run_with_a_larger_global_batch_continues_in_samples(readme_run, tmp_path):
    cwd = _copy_of(readme_run, tmp_path)
    result = _ok(_megatron_dsv3(cwd, "train", f"training.train_iters={LONGER}", "training.global_batch_size=32"))
    consumed, decay = FIRST * BATCH, LONGER * 32
    assert (f"the global batch changes 16 -> 32 and Megatron counts the schedule in samples: the {consumed} samples"
            f" of steps 1-{FIRST} count as {consumed // 32} steps of 32") in result.stdout
    # The decay (30 x 32 samples) ends after 384 + k x 32 >= 960: step 24 + 18 = 42, after the last step.
    assert f"would end with step {FIRST + (decay - consumed) // 32}" in result.stdout
    assert f"training.lr_decay_iters={LONGER - FIRST + consumed // 32} ends the decay at step {LONGER}" in result.stdout
    records = _records(cwd / "runs" / "dsv3-tiny")
    assert sorted(records) == list(range(FIRST + 1, LONGER + 1))
    for step, record in records.items():
        samples = consumed + (step - FIRST) * 32
        assert record["learning_rate"] == pytest.approx(_cosine_lr(samples, WARMUP * 32, decay), rel=1e-9), step
    log = (cwd / "runs" / "dsv3-tiny" / "train.log").read_text()
    assert re.search(rf"iteration +{LONGER}/ +{LONGER} \| consumed samples: +{consumed + (LONGER - FIRST) * 32} ", log)


@pytest.mark.slow
@pytest.mark.parametrize("schedule, name", [("1f1b", "1F1B"), ("dualpipev", "DualPipeV")])
def test_the_longer_second_run_under_pp_2_matches_the_single_process_one(readme_run, extended, tmp_path, schedule,
                                                                         name):
    cwd = _copy_of(readme_run, tmp_path)
    result = _ok(_megatron_dsv3(cwd, "train", f"training.train_iters={LONGER}", "parallel.pp=2",
                                f"parallel.schedule={schedule}", "--nproc", "2"))
    assert f"layout PP 1 -> 2, schedule none -> {name}" in result.stdout
    reference = _losses(extended[0] / "runs" / "dsv3-tiny")
    losses = _losses(cwd / "runs" / "dsv3-tiny")
    assert sorted(losses) == list(range(FIRST + 1, LONGER + 1))
    for step in losses:
        assert losses[step] == pytest.approx(reference[step], rel=1e-5), step
