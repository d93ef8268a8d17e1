"""Install, remove or inspect the start-up hook (``megatron-dsv3.pth``) by hand.

A normal ``pip install`` puts ``megatron-dsv3.pth`` into site-packages; an editable install
(``pip install -e``) cannot, so developers run ``megatron-dsv3 hook install`` once.
"""

from __future__ import annotations

import os
import sysconfig
import tempfile
from pathlib import Path

PTH_NAME = "megatron-dsv3.pth"


def pth_line() -> str:
    from _megatron_dsv3_hook import PTH_LINE

    return PTH_LINE


def pth_path() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def status() -> dict:
    import importlib.util

    path = pth_path()
    return {
        "pth_file": str(path),
        "installed": path.exists() and path.read_text() == pth_line(),
        "hook_module": getattr(importlib.util.find_spec("_megatron_dsv3_hook"), "origin", None),
        "disabled_by_env": os.environ.get("MEGATRON_DSV3_HOOK", "1").strip().lower()
        in ("0", "false", "no", "off"),
    }


def install() -> Path:
    path = pth_path()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".megatron-dsv3-", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(pth_line())
    os.chmod(tmp, 0o644)  # mkstemp makes it private; every user's interpreter must read it
    os.replace(tmp, path)  # atomic: never a half-written .pth in site-packages
    return path


def uninstall() -> bool:
    path = pth_path()
    if path.exists():
        path.unlink()
        return True
    return False
