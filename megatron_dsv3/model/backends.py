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


# ---- the routed experts: one grouped GEMM per projection, or one GEMM per expert ----
EXPERTS = ("auto", "grouped", "sequential")


@functools.cache
def grouped_mm_status(on_cpu: bool) -> tuple[bool, str]:
    """Whether ``torch.nn.functional.grouped_mm`` runs here (the local backend's grouped experts), and
    if not, why.  It is public from PyTorch 2.10 and has a CPU kernel; on a GPU Megatron asks for
    compute capability 8.0 (``--moe-grouped-gemm``), as bf16 ``grouped_mm`` does."""
    import torch

    if not hasattr(torch.nn.functional, "grouped_mm"):
        return False, f"torch {torch.__version__} has no torch.nn.functional.grouped_mm (PyTorch >= 2.10 has it)"
    if not on_cpu:
        if not torch.cuda.is_available():
            return False, "no GPU is visible and CPU mode is off"
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return False, f"compute capability {major}.{minor}: grouped_mm's GPU kernels need 8.0 or newer"
    return True, ""


def resolve_experts(requested: str | None, backend: str, *, on_cpu: bool) -> str:
    """``auto`` / ``grouped`` / ``sequential`` (None = auto) as the experts that run here.

    ``grouped``: Transformer Engine's ``TEGroupedMLP`` on that backend, our ``grouped_mm`` experts
    (:mod:`megatron_dsv3.model.grouped_experts`) on the local one; ``sequential``: Megatron's
    ``SequentialMLP``, one GEMM per expert.  ``auto`` is grouped wherever it runs; asking for grouped
    experts where ``grouped_mm`` cannot run is an error naming why."""
    requested = requested or "auto"
    if requested not in EXPERTS:
        raise ConfigError(f"unknown experts '{requested}'", fix=f"use one of: {', '.join(EXPERTS)}",
                          key="--dsv3-experts", value=requested, choices=list(EXPERTS))
    if backend != "local" or requested == "sequential":
        return "sequential" if requested == "sequential" else "grouped"
    usable, reason = grouped_mm_status(on_cpu)
    if usable:
        return "grouped"
    if requested == "grouped":
        raise ConfigError(f"grouped experts were requested but cannot run here: {reason}",
                          fix="use --dsv3-experts sequential (recipe model.experts: sequential), or upgrade"
                          " PyTorch to 2.10 or newer", key="--dsv3-experts")
    import torch

    if on_cpu or torch.cuda.is_available():  # (no device at all: arguments checked away from the job)
        warnings.warn(f"megatron-dsv3: experts auto runs one GEMM per expert (sequential) because {reason};"
                      " upgrade PyTorch to 2.10 or newer (or the GPU) for grouped experts, or pass"
                      " --dsv3-experts sequential to choose it explicitly", RuntimeWarning, stacklevel=2)
    return "sequential"
