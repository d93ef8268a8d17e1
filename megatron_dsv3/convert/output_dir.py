"""Writing a checkpoint folder atomically: into a temporary sibling, renamed into place when complete.

An interrupted run leaves only the temporary sibling (``.<name>.partial``), never something that looks
complete; the next run removes it and starts again.  An existing non-empty output folder is kept
unless the caller asks to overwrite it, and then it is replaced only after the new one is complete.
"""

from __future__ import annotations

import os
import shutil
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
