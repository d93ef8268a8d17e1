"""``megatron-dsv3 train`` end to end on CPU: Megatron's own loop, the embedded corpus, checkpoints.

Each run is a real subprocess of the command users type, with a shorter schedule.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def _train(run_dir: Path, *overrides: str, nproc: int = 1, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "megatron_dsv3.cli", "train", *overrides,
        f"checkpoint.save={run_dir}", f"checkpoint.load={run_dir}", "training.lr_warmup_iters=2",
        "--nproc", str(nproc),
    ]
    if extra:
        command += ["--", *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["lm_loss"] for r in records}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = _train(run_dir, "training.train_iters=12", "checkpoint.save_interval=12")
    return run_dir, result


def test_train_shows_progress_and_the_loss_falls(uninterrupted):
    run_dir, result = uninterrupted
    assert "[megatron-dsv3] step 12/12 | loss" in result.stdout
    assert "tokens/s" in result.stdout and "ETA" in result.stdout
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] < losses[1] - 1.0, losses  # from ~8.3 (ln 4096) down


def test_train_writes_a_checkpoint_and_a_second_run_has_nothing_left_to_do(uninterrupted):
    run_dir, _ = uninterrupted
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "12"
    assert (run_dir / "iter_0000012").is_dir()
    again = _train(run_dir, "training.train_iters=12", "checkpoint.save_interval=12")
    assert "nothing to do" in again.stdout


def test_resumed_run_reproduces_the_uninterrupted_losses(uninterrupted, tmp_path):
    reference = _losses(uninterrupted[0])
    # Stop after step 6 (Megatron's --exit-interval, same schedule), then resume to 12.
    _train(tmp_path, "training.train_iters=12", "checkpoint.save_interval=6", extra=("--exit-interval", "6"))
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    resumed = _train(tmp_path, "training.train_iters=12", "checkpoint.save_interval=6")
    assert "resuming from step 6" in resumed.stdout
    losses = _losses(tmp_path)  # the metrics file keeps both runs
    for step in range(1, 13):
        assert losses[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-6), step


def test_two_processes_with_expert_parallelism_train(tmp_path):
    result = _train(tmp_path, "training.train_iters=4", "checkpoint.save_interval=4", "parallel.ep=2",
                    nproc=2)
    assert "with 2 process(es)" in result.stdout
    losses = _losses(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses[4] < losses[1]
