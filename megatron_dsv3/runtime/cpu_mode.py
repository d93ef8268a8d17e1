"""CPU mode: Megatron-Core on CPU with the gloo backend.

One supported switch::

    from megatron_dsv3.cpu import cpu_mode, enable_cpu_mode

    with cpu_mode():            # a context manager, reverted on exit
        ...
    enable_cpu_mode()           # or for the rest of the process (the training entry points)

It applies the ``cpu`` group of run-time changes (``megatron-dsv3 changes`` lists them; among them,
TorchDynamo is turned off, since Megatron's jit fuser would spend ~10 s compiling on first use).
Processes join with the gloo backend (``--distributed-backend gloo``).  When a GPU is visible it changes nothing and
returns False: CPU mode exists for machines without one.
"""

from __future__ import annotations

import contextlib

from megatron_dsv3.runtime import cpu_changes, cpu_cuda_changes, cpu_gloo_changes
from megatron_dsv3.runtime.registry import apply_changes, changes_in, revert_changes

# The modules defining the ``cpu`` group (the catalog lists them from here).
CPU_CHANGE_MODULES = (cpu_changes, cpu_cuda_changes, cpu_gloo_changes)

_state = {"enabled": False}


def _cpu_changes():
    return [change for module in CPU_CHANGE_MODULES for change in changes_in(module)]


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def is_cpu_mode() -> bool:
    return _state["enabled"]


def enable_cpu_mode() -> bool:
    """Let Megatron-Core run on CPU for the rest of the process; a no-op (False) on a GPU machine."""
    if _state["enabled"]:
        return True
    if gpu_available():
        return False
    apply_changes(_cpu_changes())
    _state["enabled"] = True
    return True


def disable_cpu_mode() -> None:
    """Undo :func:`enable_cpu_mode` (used by the context manager and tests)."""
    if not _state["enabled"]:
        return
    revert_changes(_cpu_changes())
    _state["enabled"] = False


@contextlib.contextmanager
def cpu_mode():
    """Context manager form of :func:`enable_cpu_mode`; restores PyTorch and Megatron on exit."""
    was_enabled = _state["enabled"]
    enabled = enable_cpu_mode()
    try:
        yield enabled
    finally:
        if enabled and not was_enabled:
            disable_cpu_mode()
