"""Wiring into unmodified Megatron-LM: ``--spec dsv3``, the plugin's options, the start-up hook.

:func:`activate` applies the ``launch`` and ``model`` groups of run-time changes (``megatron-dsv3
changes``).  The start-up hook (``_megatron_dsv3_hook.py``, installed as ``megatron-dsv3.pth``)
calls it when ``megatron.training`` is imported; teams that forbid start-up hooks apply
``patches/`` to their Megatron-LM checkout instead, which calls it explicitly.  Calling it twice is
harmless.
"""

from __future__ import annotations

_activated: list[str] = []


def activate(source: str = "explicit call") -> None:
    from megatron_dsv3.runtime.catalog import apply_group

    apply_group("launch")
    apply_group("model")
    if not _activated:
        _activated.append(source)


def activated_by() -> str | None:
    """Who activated the plugin in this process (``"start-up hook"``, ...), or None."""
    return _activated[0] if _activated else None
