"""The two backends of the ``dsv3`` spec, and the one place that decides which one runs.

* ``transformer_engine``: Transformer Engine modules (Megatron's ``TESpecProvider``); needed for FP8
  through TE and the fastest GPU kernels.
* ``local``: Megatron-Core's own PyTorch modules with the replacements DeepSeek-V3 needs (see
  :mod:`megatron_dsv3.model.providers`).

``auto`` picks Transformer Engine when it imports on a machine with a GPU and the local backend
otherwise.  It is resolved on the machine that runs the job (arguments are often made on a login
node), by :func:`resolve_backend`.  Transformer Engine installed but failing to import is said in a
warning naming the import error, never silently passed over; asking for it where it cannot run is an
error.  No Megatron import here.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

from megatron_dsv3.errors import ConfigError

BACKENDS = ("auto", "transformer_engine", "local")


@dataclass(frozen=True)
class TransformerEngineStatus:
    usable: bool
    reason: str  # why not, in words ("" when usable)
    installed: bool = False


@functools.cache
def transformer_engine_status() -> TransformerEngineStatus:
    """Whether Transformer Engine can run here, and if not, why (cached for the process)."""
    import importlib.util

    import torch

    installed = importlib.util.find_spec("transformer_engine") is not None
    if not torch.cuda.is_available():
        return TransformerEngineStatus(False, "no GPU is visible", installed)
    if not installed:
        return TransformerEngineStatus(False, "Transformer Engine is not installed (pip install megatron-dsv3[te])")
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # a broken build raises anything from OSError to RuntimeError
        return TransformerEngineStatus(False, f"Transformer Engine is installed but fails to import"
                                       f" ({type(err).__name__}: {err})", True)
    return TransformerEngineStatus(True, "", True)


def transformer_engine_usable() -> bool:
    return transformer_engine_status().usable


def resolve_backend(requested: str | None) -> str:
    """``auto`` / ``transformer_engine`` / ``local`` (None = auto) as the backend that runs here."""
    requested = requested or "auto"
    if requested not in BACKENDS:
        raise ConfigError(
            f"unknown backend '{requested}'",
            fix=f"use one of: {', '.join(BACKENDS)}",
            key="backend",
            value=requested,
            choices=list(BACKENDS),
        )
    status = transformer_engine_status()
    if requested == "auto":
        if status.usable:
            return "transformer_engine"
        if status.installed:
            warnings.warn(
                f"megatron-dsv3: backend auto uses the local backend because {status.reason}. Fix the"
                " Transformer Engine install, or pass --dsv3-backend local to choose it explicitly",
                RuntimeWarning,
                stacklevel=2,
            )
        return "local"
    if requested == "transformer_engine" and not status.usable:
        raise ConfigError(
            f"backend 'transformer_engine' was requested but Transformer Engine cannot be used here:"
            f" {status.reason}",
            fix="install Transformer Engine on a GPU machine, or use backend 'local' / 'auto'"
            " (--dsv3-backend local)",
            key="backend",
        )
    return requested


def planned_backend(requested: str, on_cpu: bool) -> str:
    """The backend to plan with before the job runs: ``local`` on CPU; ``auto`` counts as local
    (no fused norms, no grouped GEMM), which never underestimates memory."""
    if on_cpu:
        return "local"
    return "local" if requested == "auto" else requested
