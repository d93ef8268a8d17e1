"""CPU mode: Megatron-Core on CPU with the gloo backend (the public name; the switch itself is
:mod:`megatron_dsv3.runtime.cpu_mode`, beside the ``cpu`` run-time changes it applies).

    from megatron_dsv3.cpu import cpu_mode, enable_cpu_mode

    with cpu_mode():            # a context manager, reverted on exit
        ...
    enable_cpu_mode()           # or for the rest of the process (the training entry points)

``docs/cpu-mode.md`` says what it changes and how it is undone.
"""

from __future__ import annotations

from megatron_dsv3.runtime.cpu_mode import cpu_mode, disable_cpu_mode, enable_cpu_mode, gpu_available, is_cpu_mode

__all__ = ["cpu_mode", "disable_cpu_mode", "enable_cpu_mode", "gpu_available", "is_cpu_mode"]
