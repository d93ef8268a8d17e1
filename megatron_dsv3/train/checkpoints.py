"""What ``megatron-dsv3 train`` resumes from, checked before any worker starts; one trainer per folder.

Megatron reads the tracker file (``latest_checkpointed_iteration.txt``) and the step folder it names
deep inside its loading code, where a damaged file surfaces as a bare ``EOFError`` or
``FileNotFoundError``.  :func:`resume_step` reads the same files first and turns each problem into
an error naming the file and the fix; nothing is deleted or rewritten.  :class:`FolderLock` keeps a
second trainer out of a checkpoint folder that a running one holds.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import zipfile
from pathlib import Path

from megatron_dsv3.errors import ConfigError

TRACKER = "latest_checkpointed_iteration.txt"
LOCK = ".megatron-dsv3.lock"


def step_folder(load_dir: Path, step: int) -> Path:
    return load_dir / f"iter_{step:07d}"


def resume_step(load_dir: str | None) -> int | None:
    """The step a run loading ``load_dir`` resumes from (None: nothing to resume; 0: a ``release``
    checkpoint of weights), after checking the files it will read."""
    if not load_dir:
        return None
    folder = Path(load_dir)
    tracker = folder / TRACKER
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    if text == "release":  # Megatron's name for a checkpoint of weights to start from (a converted one)
        step, checkpoint = 0, folder / "release"
    else:
        try:
            step = int(text)
        except ValueError:
            raise _damaged(tracker, f"holds {text!r}, not a step number (or 'release')", folder) from None
        checkpoint = step_folder(folder, step)
    if not checkpoint.is_dir():
        raise _damaged(tracker, f"names step {step}, but {checkpoint} does not exist", folder)
    _verify_checkpoint(checkpoint, folder)
    return step


def _damaged(path: Path, problem: str, folder: Path) -> ConfigError:
    steps = sorted(p.name for p in folder.glob("iter_*") if p.is_dir())
    found = f" (step folders there: {', '.join(steps)})" if steps else " (no step folder is there)"
    return ConfigError(
        f"cannot resume from {folder}: {path} {problem}",
        fix=f"restore the file from a copy, or write the step of a complete checkpoint into {folder / TRACKER}"
        f"{found}, or train in another folder (checkpoint.save=... checkpoint.load=...); nothing was changed",
        key="checkpoint.load",
    )


def _verify_checkpoint(checkpoint: Path, folder: Path) -> None:
    """Every file the checkpoint's own index names is there and at least as long as the index says."""
    metadata = checkpoint / "metadata.json"
    if metadata.exists():  # Megatron's distributed checkpoint (torch_dist, torch_dcp)
        try:
            json.loads(metadata.read_text())
        except ValueError as err:
            raise _damaged(metadata, f"is not valid JSON ({err})", folder) from None
        _verify_distributed(checkpoint, folder)
    for path in sorted(checkpoint.rglob("*.pt")):  # common.pt, legacy torch-format shards
        if not zipfile.is_zipfile(path):
            raise _damaged(path, "is not a complete PyTorch file (truncated?)", folder)
        with zipfile.ZipFile(path) as archive:
            if archive.testzip() is not None:
                raise _damaged(path, "fails its checksum (truncated or corrupted)", folder)


def _verify_distributed(checkpoint: Path, folder: Path) -> None:
    if not (checkpoint / ".metadata").exists():
        raise _damaged(checkpoint / ".metadata", "is missing (the checkpoint's index)", folder)
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(checkpoint)).read_metadata()
    except Exception as err:  # a truncated pickle raises EOFError, UnpicklingError, ...
        raise _damaged(checkpoint / ".metadata", f"cannot be read ({type(err).__name__}: {err})", folder) from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = checkpoint / name
        if not path.exists():
            raise _damaged(path, "is missing (the checkpoint's index names it)", folder)
        if path.stat().st_size < size:
            raise _damaged(path, f"has {path.stat().st_size:,} bytes but the checkpoint's index needs {size:,}"
                           " (truncated)", folder)


class FolderLock:
    """An exclusive lock on a training folder, held while a trainer runs (``flock`` on ``.megatron-dsv3.lock``).

    The kernel releases it when the holder exits, however it exits; the file says who holds it.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"{self.path.parent} is in use by a running trainer ({holder}); two trainers would write"
                " the same checkpoints",
                fix="wait for it to finish (or stop it), or give this run another folder with"
                " checkpoint.save=... checkpoint.load=...",
                key="checkpoint.save",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.ctime()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
