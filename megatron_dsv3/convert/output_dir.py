"""Writing a checkpoint folder atomically: into a temporary sibling, renamed into place when complete.

:func:`check_writable` refuses an output folder that cannot be created, before any work.  The
writing happens inside :func:`partial_output`: an error or Ctrl-C there removes the temporary
sibling (``.<name>.partial``, as large as the checkpoint) and says so in a note on the exception;
a run killed outright leaves only that sibling, never something that looks complete, and the next
run removes it and starts again.  An existing non-empty output folder is kept unless the caller
asks to overwrite it, and then it is replaced only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from megatron_dsv3.errors import ConfigError


def temporary_sibling(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial"


def refuse_existing(out_dir: Path) -> None:
    """An error if ``out_dir`` exists and is not empty (checked before any work, and again by :func:`prepare`)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir} exists and is not empty",
                          fix="choose a new output folder, or pass --overwrite to replace it once the new one is"
                              " complete", where=str(out_dir))


def check_writable(out_dir: Path) -> None:
    """An error if ``out_dir`` and its temporary sibling cannot be created (checked before any work)."""
    out_dir = Path(out_dir).absolute()
    existing = out_dir.parent
    while not existing.exists():
        existing = existing.parent
    fix = "choose an output folder on a disk you can write to"
    if not existing.is_dir():
        raise ConfigError(f"cannot write {out_dir}: {existing} is a file, not a folder", fix=fix, key="out")
    try:  # a real probe: permissions alone do not tell (root on a read-only or virtual file system)
        os.rmdir(tempfile.mkdtemp(prefix=f".{out_dir.name}.probe-", dir=existing))
    except OSError as err:
        raise ConfigError(f"cannot write {out_dir}: no folder can be made in {existing} ({err.strerror})",
                          fix=fix, key="out") from None


@contextlib.contextmanager
def partial_output(out_dir: Path, *, overwrite: bool):
    """The temporary folder to write ``out_dir`` into; renamed to ``out_dir`` when the block ends, removed
    when it raises (an error or Ctrl-C), with a note on the exception saying so."""
    out_dir = Path(out_dir)
    tmp = prepare(out_dir, overwrite=overwrite)
    try:
        yield tmp
    except BaseException as err:
        try:
            shutil.rmtree(tmp)
            err.add_note(f"removed the partial output {tmp}; {out_dir} was not written")
        except OSError as cleanup:
            err.add_note(f"the partial output {tmp} could not be removed ({cleanup.strerror}): delete it by hand")
        raise
    publish(tmp, out_dir)


def prepare(out_dir: Path, *, overwrite: bool) -> Path:
    """A fresh, empty temporary sibling of ``out_dir`` (what an interrupted earlier run left is removed)."""
    out_dir = Path(out_dir)
    if not overwrite:
        refuse_existing(out_dir)
    tmp = temporary_sibling(out_dir)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` to ``out_dir``; an old ``out_dir`` is removed only after that."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
