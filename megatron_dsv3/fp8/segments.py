"""Token segments: where an expert's tokens came from, so that FP8 tiles along tokens never span two sources.

Under expert parallelism an expert's input is the concatenation of the tokens every
expert-parallel rank sent it (Megatron's all-to-all dispatcher sorts them by local expert, then by
source rank).  The weight-gradient GEMM tiles its operands along tokens (128 tokens per tile); a
tile spanning two ranks' tokens would depend on how the batch was split.  So the dispatcher's
per-source counts (the ``model`` run-time change ``moe_experts_know_their_token_sources``) are
handed to the experts' FP8 GEMMs as *segments*, and tiles restart at every segment: the weight
gradient is then the sum of per-source GEMMs, the same as one process computing each micro-batch
on its own.  Sources that are tensor-parallel shards of one rank's sequence (``ETP > 1`` with
``EP = 1``) are contiguous token order and form a single segment; with ``EP > 1`` and ``ETP > 1``
together every (ETP, EP) source is its own segment when a rank holds several experts.  With one
local expert there, Megatron keeps no per-(ETP, EP) counts (``num_global_tokens_per_local_expert``
is stored only for several local experts, ``token_dispatcher.py``), so the expert's tokens are one
segment: a valid 1x128 tiling, but not the single-process run's tiles bit for bit.
"""

from __future__ import annotations

_CURRENT: list = [None]  # the segments of the expert whose Linears are running, or None


def current_segments():
    """Token counts per segment of the rows the running expert's Linears see, or None (one segment)."""
    return _CURRENT[0]


def set_current_segments(segments) -> None:
    _CURRENT[0] = segments


class TokenSources:
    """Per local expert, the number of its tokens from each source, recorded at dispatch."""

    def __init__(self):
        self.wanted = False  # set when FP8 experts exist, so that dispatch pays nothing otherwise
        self._pending = None

    def record(self, dispatcher) -> None:
        """Read the counts of Megatron's ``MoEAlltoAllTokenDispatcher`` after ``dispatch_postprocess``."""
        if not self.wanted:
            return
        ep, tp, local = dispatcher.ep_size, dispatcher.tp_size, dispatcher.num_local_experts
        if ep == 1:
            self._pending = None  # one source rank: one segment
            return
        if local > 1:
            counts = dispatcher.num_global_tokens_per_local_expert.reshape(-1, local).tolist()
            self._pending = [[row[e] for row in counts] for e in range(local)]  # [expert][source]
        elif tp == 1:
            self._pending = [[int(c) for c in dispatcher.output_splits.tolist()]]
        else:
            self._pending = None  # counts per (ETP, EP) source are not kept for one local expert

    def take(self):
        """The counts recorded at the last dispatch (``[expert][source]``, or None), once."""
        pending, self._pending = self._pending, None
        return pending


TOKEN_SOURCES = TokenSources()
