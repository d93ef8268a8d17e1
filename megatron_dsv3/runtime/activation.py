"""Activating the plugin in a process: the ``launch`` and ``model`` groups of run-time changes.

What makes stock Megatron-LM take ``--spec dsv3`` and build DeepSeek-V3's layers correctly
(``megatron-dsv3 changes`` lists each change).  The start-up hook (``_megatron_dsv3_hook.py``, installed
as ``megatron-dsv3.pth``) calls it when ``megatron.training`` is imported; teams that forbid start-up
hooks apply ``patches/`` to their Megatron-LM checkout, which calls it explicitly (as
``megatron_dsv3.launch.activate``, the public name); ``megatron-dsv3 train``, the converter and the
tests call it themselves.  Calling it twice is harmless.
"""

from __future__ import annotations

_activated: list[str] = []


def activate(source: str = "explicit call") -> None:
    # lazy: the catalog imports torch and every change's module; `megatron-dsv3 hook status` and the
    # start-up hook's import of megatron_dsv3.launch must stay cheap until a process activates.
    from megatron_dsv3.runtime.catalog import apply_group

    apply_group("launch")
    apply_group("model")
    if not _activated:
        _activated.append(source)


def activated_by() -> str | None:
    """Who activated the plugin in this process (``"start-up hook"``, ...), or None."""
    return _activated[0] if _activated else None
