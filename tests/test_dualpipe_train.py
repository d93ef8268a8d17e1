"""``megatron-dsv3 train`` under DualPipeV: Megatron's own loop on two processes, its checkpoints, and
a checkpoint that moves between DualPipeV and 1F1B (the chunks keep the single-process keys).

Each run is a real subprocess of the command users type.
"""

from __future__ import annotations

import re
import shutil

import pytest
from test_train_job import _losses, _train

V = ("parallel.pp=2", "parallel.schedule=dualpipev", "training.train_iters=8", "checkpoint.save_interval=4")


@pytest.fixture(scope="module")
def stopped_at_4(tmp_path_factory):
    """DualPipeV for 4 of 8 steps (Megatron's --exit-interval: the same LR schedule), checkpoint at 4."""
    run_dir = tmp_path_factory.mktemp("dualpipev")
    result = _train(run_dir, *V, nproc=2, extra=("--exit-interval", "4"))
    return run_dir, result


def test_dualpipev_trains_through_megatrons_loop_and_checkpoints(stopped_at_4):
    run_dir, result = stopped_at_4
    assert "with 2 process(es) (PP 2, DualPipeV)" in result.stdout
    losses = _losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    # MTP runs on rank 0 under DualPipeV; Megatron's log line (last rank) still reports its loss.
    log = (run_dir / "train.log").read_text()
    assert re.search(r"iteration +4/ +8 .*mtp_1 loss: \d\.\d+E\+00", log), log[-2000:]


def test_a_dualpipev_checkpoint_resumes_under_dualpipev_and_under_1f1b_alike(stopped_at_4, tmp_path):
    run_dir, _ = stopped_at_4
    as_1f1b = tmp_path / "1f1b"
    shutil.copytree(run_dir, as_1f1b)
    (as_1f1b / "metrics.jsonl").unlink()
    resumed_v = _train(run_dir, *V, nproc=2)
    resumed_1f1b = _train(as_1f1b, *V, "parallel.schedule=1f1b", nproc=2)
    assert "resuming from step 4" in resumed_v.stdout and "(PP 2, 1F1B)" in resumed_1f1b.stdout
    v, plain = _losses(run_dir), _losses(as_1f1b)
    assert sorted(plain) == [5, 6, 7, 8]
    for step in (5, 6, 7, 8):
        assert plain[step] == pytest.approx(v[step], rel=1e-6), step


@pytest.mark.slow
def test_dualpipe_resumed_from_its_checkpoint_repeats_the_uninterrupted_losses(tmp_path):
    """DualPipe on 2 processes (each rank a stage and a copy of the other's) through ``megatron-dsv3
    train``, Megatron's own loop, with ``--overlap-grad-reduce`` and the B/W split, Adam, gradient
    clipping and the expert-bias update: 8 steps with checkpoints at 4 and 8, then the checkpoint of
    step 4 resumed under DualPipe: steps 5-8 give the uninterrupted run's losses.  Run with
    ``pytest -m slow`` (about 5 minutes)."""
    dualpipe = ("parallel.pp=2", "parallel.schedule=dualpipe", "parallel.zero_bubble=true", "training.train_iters=8",
                "checkpoint.save_interval=4")
    overlap = ("--overlap-grad-reduce",)
    uninterrupted = tmp_path / "uninterrupted"
    result = _train(uninterrupted, *dualpipe, nproc=2, extra=overlap)
    assert "(PP 2, DualPipe)" in result.stdout
    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted, resumed)
    (resumed / "metrics.jsonl").unlink()
    shutil.rmtree(resumed / "iter_0000008")
    (resumed / "latest_checkpointed_iteration.txt").write_text("4")
    assert "resuming from step 4" in _train(resumed, *dualpipe, nproc=2, extra=overlap).stdout
    before, after = _losses(uninterrupted), _losses(resumed)
    assert sorted(before) == list(range(1, 9)) and sorted(after) == [5, 6, 7, 8]
    assert before[8] < before[1]
    for step in (5, 6, 7, 8):
        assert after[step] == pytest.approx(before[step], rel=1e-6), (step, after[step], before[step])
