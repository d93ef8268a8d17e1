"""Routed experts in FP8: one GEMM per expert, and token segments that keep tiles layout-independent.

PyTorch has no block-wise FP8 grouped GEMM (``F.scaled_grouped_mm`` covers MXFP8 and row-wise
only, FACTS.md), so the local backend's experts stay Megatron's ``SequentialMLP``: one FP8 GEMM per
expert and per GEMM kind.

Under expert parallelism an expert's input is the concatenation of the tokens every
expert-parallel rank sent it (Megatron's all-to-all dispatcher sorts them by source rank).  The
weight-gradient GEMM tiles its operands along tokens (128 tokens per tile); a tile spanning two
ranks' tokens would depend on how the batch was split.  So the dispatcher's per-source counts (the
``model`` run-time change ``moe_experts_know_their_token_sources``) are handed to each expert's FP8
Linears as *segments*, and tiles restart at every segment: the weight gradient is then the sum of
per-source GEMMs, the same as one process computing each micro-batch on its own.  Sources that are
tensor-parallel shards of one rank's sequence (``ETP > 1`` with ``EP = 1``) are contiguous token
order and form a single segment; with ``EP > 1`` and ``ETP > 1`` together every (ETP, EP) source is
its own segment.
"""

from __future__ import annotations

from megatron.core.transformer.moe.experts import SequentialMLP

_CURRENT: list = [None]  # the segments of the expert whose Linears are running, or None


def current_segments():
    """Token counts per segment of the rows the running expert's Linears see, or None (one segment)."""
    return _CURRENT[0]


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
        pending, self._pending = self._pending, None
        return pending


TOKEN_SOURCES = TokenSources()


class FP8SequentialMLP(SequentialMLP):
    """Megatron's ``SequentialMLP`` whose experts' FP8 Linears see the token segments of their input."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        TOKEN_SOURCES.wanted = True
        self._sources = None
        for index, expert in enumerate(self.local_experts):
            expert.register_forward_pre_hook(self._enter(index))
            expert.register_forward_hook(_leave)

    def _enter(self, index: int):
        def hook(module, args):
            _CURRENT[0] = self._sources[index] if self._sources is not None else None
        return hook

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        self._sources = TOKEN_SOURCES.take()
        try:
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        finally:
            self._sources = None
            _CURRENT[0] = None


def _leave(module, args, output):
    _CURRENT[0] = None
