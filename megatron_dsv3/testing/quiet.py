"""Quiet Megatron for benchmark scripts: their table, not pages of INFO logging (``--verbose`` shows it)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings


def quiet_megatron(verbose: bool = False) -> None:
    """Megatron's and PyTorch's loggers at WARNING, import-time warnings about optional packages off."""
    if verbose:
        return
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.basicConfig(level=logging.WARNING)
    for name in ("megatron", "megatron.core", "megatron.training", "torch", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def silenced(verbose: bool = False):
    """Swallow what Megatron prints to stdout (``print_rank_0`` progress) unless ``verbose``."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
