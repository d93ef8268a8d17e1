"""The two backends of the ``dsv3`` spec and how one is chosen (no Megatron import here).

* ``transformer_engine``: Megatron-Core's Transformer Engine modules (``TESpecProvider``); needed
  for FP8 and the fastest GPU kernels.
* ``local``: Megatron-Core's own PyTorch modules (``LocalSpecProvider``) with two replacements that
  make it correct for DeepSeek-V3: an MLA-capable core attention and an RMSNorm that supports
  sequence parallelism (see :mod:`megatron_dsv3.spec.backends`).

``auto`` picks Transformer Engine when it imports on a machine with a GPU and the local backend
otherwise; asking for Transformer Engine where it cannot run is an error, never a silent fallback.
"""

from __future__ import annotations

import functools

from megatron_dsv3.errors import ConfigError

BACKENDS = ("auto", "transformer_engine", "local")


@functools.cache
def transformer_engine_usable() -> bool:
    """True when a GPU is visible and Transformer Engine imports (it cannot without a GPU)."""
    import importlib.util

    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(requested: str | None) -> str:
    """Turn ``auto``/``transformer_engine``/``local`` (or None = auto) into a concrete backend."""
    requested = requested or "auto"
    if requested not in BACKENDS:
        raise ConfigError(
            f"unknown backend '{requested}'",
            fix=f"use one of: {', '.join(BACKENDS)}",
            key="backend",
            value=requested,
            choices=list(BACKENDS),
        )
    if requested == "auto":
        return "transformer_engine" if transformer_engine_usable() else "local"
    if requested == "transformer_engine" and not transformer_engine_usable():
        raise ConfigError(
            "backend 'transformer_engine' was requested but Transformer Engine cannot be used here"
            " (it needs a GPU and `pip install megatron-dsv3[te]`)",
            fix="install Transformer Engine on a GPU machine, or use backend 'local' / 'auto'"
            " (--dsv3-backend local)",
            key="backend",
        )
    return requested
