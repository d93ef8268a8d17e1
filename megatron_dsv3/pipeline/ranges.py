"""A named range around each operation a DualPipe / DualPipeV rank runs, for the profilers.

The name is the operation's (:class:`megatron_dsv3.pipeline.engine.Op`: ``F0.3``, ``B1.2``,
``B1.2z`` for an input-gradient-only backward, ``W1.2``, ``F0.4&B1.1``), the same names
``megatron-dsv3 schedule --order`` prints and the simulator draws.  It is a PyTorch profiler
``record_function`` (in the Chrome trace of ``profiling.torch_profiler``, and an NVTX range under
Megatron's ``--profile`` / ``emit_nvtx``) and, on a GPU, an explicit NVTX range, so an Nsight
Systems timeline shows the schedule as the simulator draws it.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def op_range(name: str):
    nvtx = torch.cuda.is_available()
    with torch.profiler.record_function(name):
        if nvtx:
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if nvtx:
                torch.cuda.nvtx.range_pop()
