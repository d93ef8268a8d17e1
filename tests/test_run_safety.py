"""What ``megatron-dsv3 train`` reads and holds, tried as a new user would by damaging each.

* a truncated checkpoint file, a tracker naming a missing step, a damaged tracker: an error naming
  the file and the fix before any worker starts, and nothing changed on disk;
* a truncated prepared corpus in the cache: verified and rebuilt by itself;
* ``kill -9`` of the launcher: its worker dies with it; a folder a running trainer holds is refused
  to a second trainer;
* a recipe with a YAML tag: refused as a tag, never constructed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.recipe import loads_recipe


def _train(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "megatron_dsv3.cli", "train", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoint")
    result = _train("training.train_iters=2", "training.lr_warmup_iters=1", "checkpoint.save_interval=2",
                    f"checkpoint.save={folder}", f"checkpoint.load={folder}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return folder


def _damaged_copy(checkpoint: Path, tmp_path: Path, damage) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(checkpoint, copy)
    damage(copy)
    return copy


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize("damage, words", [
    (lambda d: _truncate(d / "iter_0000002" / "__0_0.distcp"), ["__0_0.distcp", "(truncated)"]),
    (lambda d: _truncate(d / "iter_0000002" / ".metadata"), [".metadata", "cannot be read"]),
    (lambda d: (d / "latest_checkpointed_iteration.txt").write_text("7\n"),
     ["names step 7", "iter_0000007 does not exist", "step folders there: iter_0000002"]),
    (lambda d: (d / "latest_checkpointed_iteration.txt").write_text("seven"), ["holds 'seven'"]),
], ids=["truncated-shard", "truncated-index", "missing-step-folder", "bad-tracker"])
def test_a_damaged_resume_input_is_named_with_its_fix_before_training_starts(checkpoint, tmp_path, damage, words):
    run = _damaged_copy(checkpoint, tmp_path, damage)
    before = _digest(run)
    # train_iters below the tracker's step too: the tracker is checked before "nothing to do".
    for iters in ("4", "1"):
        result = _train(f"training.train_iters={iters}", f"checkpoint.save={run}", f"checkpoint.load={run}",
                        "checkpoint.save_interval=2", "training.lr_warmup_iters=0", timeout=120)
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        assert "cannot resume from" in result.stderr and "Fix:" in result.stderr, result.stderr
        for word in words:
            assert word in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and "[megatron-dsv3] training" not in result.stdout
    assert _digest(run) == before  # nothing was changed


def test_a_truncated_prepared_corpus_is_rebuilt_by_itself(tmp_path, capsys):
    from megatron_dsv3 import data

    prefix = Path(data.prepare_dataset(tmp_path))
    bin_file = prefix.with_suffix(".bin")
    size = bin_file.stat().st_size
    _truncate(bin_file)
    assert "but its index describes" in data.dataset_damage(prefix)
    assert data.prepare_dataset(tmp_path) == str(prefix)
    assert bin_file.stat().st_size == size and data.dataset_damage(prefix) is None
    assert "was damaged" in capsys.readouterr().err


def test_a_yaml_tag_in_a_recipe_is_refused_as_a_tag():
    text = "model:\n  preset: !!python/object/apply:os.system ['echo owned']\n"
    with pytest.raises(ConfigError) as err:
        loads_recipe(text, source="evil.yaml")
    message = str(err.value)
    assert "evil.yaml:2" in message and "YAML tags are not allowed" in message
    assert "!!python/object/apply:os.system" in message and "Fix:" in message


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_worker_dies_with_its_launcher_and_a_held_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "megatron_dsv3.cli", "train", "training.train_iters=500",
               f"checkpoint.save={run}", f"checkpoint.load={run}", "checkpoint.save_interval=500"]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    spawned = [psutil.Process(launcher.pid)]
    try:
        _wait_for(lambda: "step 2/500" in (run / "train.log").read_text() if (run / "train.log").exists() else False,
                  240, "the first training steps")
        (worker,) = psutil.Process(launcher.pid).children()
        spawned += psutil.Process(launcher.pid).children(recursive=True)
        second = _train(f"checkpoint.save={run}", f"checkpoint.load={run}", "checkpoint.save_interval=500",
                        timeout=120)
        assert second.returncode == 2
        assert "is in use by a running trainer" in second.stderr and f"pid {launcher.pid}" in second.stderr
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(30)
        _wait_for(lambda: not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE, 30,
                  "the worker to exit")
    finally:
        for process in spawned:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
    from megatron_dsv3.train.checkpoints import FolderLock

    with FolderLock(run):  # the kernel released the dead launcher's lock
        pass
