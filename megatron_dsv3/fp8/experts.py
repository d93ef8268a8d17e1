"""Routed experts in block-wise FP8: Megatron's ``SequentialMLP`` of FP8 Linears, or the grouped experts in FP8.

PyTorch has no block-wise FP8 grouped GEMM (``F.scaled_grouped_mm`` covers MXFP8 and row-wise only:
``aten/src/ATen/native/cuda/ScaledBlas.cpp``, torch 2.14), so either way each expert's GEMMs are
separate FP8 GEMMs (one ``torch._scaled_mm`` per non-empty expert on a GPU).  What the grouped experts
(:class:`FP8GroupedExperts`, the local backend's ``--dsv3-experts grouped``) save is the per-expert work
around them:

* the permuted tokens of all experts are quantised in one pass: a 1x128 tile is one token's 128
  channels, so one quantisation serves every expert (the codes are those each expert's own
  quantisation would give), and so is the incoming gradient for Dgrad;
* all experts' weights are quantised in one pass, each expert in its own 128x128 blocks (rows
  padded with zeros to whole blocks per expert; zeros change no block's amax), and Dgrad reads
  the same blocks transposed, as the dense FP8 Linear does;
* Wgrad tiles run along tokens (128 tokens of one channel): both operands are quantised in one
  pass with every segment (an expert's tokens from one source, :mod:`megatron_dsv3.fp8.segments`)
  zero-padded to whole tiles, so tiles restart at each segment as in the dense FP8 Linear; each
  expert's weight gradient is then one GEMM over its padded segments (the sum of the per-segment
  GEMMs, accumulated in one pass).

Fprop, Dgrad and Wgrad are those of :mod:`megatron_dsv3.fp8.linear` (same quantizer, same plan
backend: emulated or ``torch._scaled_mm``); an expert without tokens runs no GEMM and gets a zero
weight gradient; the weight GEMMs can wait in the zero-bubble queue (DualPipe's W).  Recipes with
2-D activation or gradient blocks (not DeepSeek's) quantise those operands expert by expert.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_dsv3.fp8.linear import FP8LinearMixin, _fprop_like
from megatron_dsv3.fp8.plan import FP8Plan
from megatron_dsv3.fp8.quantize import BlockQuantized
from megatron_dsv3.fp8.segments import TOKEN_SOURCES, set_current_segments
from megatron_dsv3.model.grouped_experts import GroupedExperts
from megatron_dsv3.model.grouped_gemm import GroupedLinear, grouped_linear
from megatron_dsv3.model.wgrad import WGRAD


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
            set_current_segments(self._sources[index] if self._sources is not None else None)
        return hook

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        self._sources = TOKEN_SOURCES.take()
        try:
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        finally:
            self._sources = None
            set_current_segments(None)


def _leave(module, args, output):
    set_current_segments(None)


# ---- the grouped experts in FP8 ----
def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def _token_rows(q: BlockQuantized, start: int, stop: int) -> BlockQuantized:
    """Rows ``start:stop`` of an operand quantised in 1 x K-block tiles (one scale row per token)."""
    return BlockQuantized(q.data[start:stop], q.scale_inv[start:stop], q.block)


def quantize_stacked_weights(plan: FP8Plan, weight: torch.Tensor, name: str) -> list[BlockQuantized]:
    """Every expert's weight of the stacked ``weight`` (E, N, K) in its own blocks, in one pass."""
    experts, n, k = weight.shape
    rows = plan.recipe.block("weight")[0]
    padded = _ceil_to(n, rows)
    w = weight if padded == n else torch.nn.functional.pad(weight, (0, 0, 0, padded - n))
    q = plan.quantize(w.reshape(experts * padded, k), "weight", name=name)
    per = padded // rows
    return [BlockQuantized(q.data[e * padded:e * padded + n], q.scale_inv[e * per:(e + 1) * per], q.block)
            for e in range(experts)]


def _segments(counts: list[int], sources) -> list[list[int]]:
    """Each expert's token segments (its per-source counts, or its whole count)."""
    return [list(sources[e]) if sources is not None else [c] for e, c in enumerate(counts)]


def quantize_along_tokens(plan: FP8Plan, t: torch.Tensor, role: str, segments: list[list[int]], name: str):
    """``t`` (T, C) quantised for a GEMM contracting the tokens, tiles restarting at every segment:
    the result is ``t^T`` with each segment zero-padded to whole tiles, and each expert's
    ``(start, stop)`` columns in it."""
    tile = plan.recipe.block(role)[1]
    sizes = [s for expert in segments for s in expert]
    padded = [_ceil_to(s, tile) for s in sizes]
    if padded != sizes:
        starts = torch.tensor([0] + padded[:-1]).cumsum(0).repeat_interleave(torch.tensor(sizes))
        within = torch.arange(sum(sizes)) - torch.tensor([0] + sizes[:-1]).cumsum(0).repeat_interleave(torch.tensor(sizes))
        full = t.new_zeros(sum(padded), t.shape[1])
        full[(starts + within).to(t.device)] = t
        t = full
    q = plan.quantize(t, role, along="rows", name=name)
    bounds, start = [], 0
    for expert in segments:
        stop = start + sum(_ceil_to(s, tile) for s in expert)
        bounds.append((start, stop))
        start = stop
    return q, bounds


def _columns(q: BlockQuantized, start: int, stop: int) -> BlockQuantized:
    tile = q.block[1]
    return BlockQuantized(q.data[:, start:stop], q.scale_inv[:, start // tile:stop // tile], q.block)


def _fprop_grouped(plan, rows, role, b, counts, segments, name, n):
    """``rows_e @ b_e^T`` for every expert with tokens; 1 x K-block tiles quantised once for all."""
    out = rows.new_empty(rows.shape[0], n)
    one_pass = plan.recipe.block(role)[0] == 1
    q = plan.quantize(rows, role, name=name) if one_pass else None
    start = 0
    for e, count in enumerate(counts):
        if count:
            stop = start + count
            out[start:stop] = (plan.gemm(_token_rows(q, start, stop), b[e], rows.dtype) if one_pass
                               else _fprop_like(plan, rows[start:stop], role, b[e], segments[e], name))
            start = stop
    return out


class _FP8GroupedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, counts, sources, plan, name):
        segments = _segments(counts, sources)
        weight_q = quantize_stacked_weights(plan, weight, name)
        output = _fprop_grouped(plan, x, "activation", weight_q, counts, segments, name, weight.shape[1])
        ctx.save_for_backward(x, weight)
        two_d = plan.recipe.block("weight")[0] > 1  # 2-D blocks serve Dgrad transposed
        ctx.weight_q_t = [q.t() for q in weight_q] if two_d else None
        ctx.counts, ctx.segments, ctx.plan, ctx.name = counts, segments, plan, name
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        plan, name, counts, segments = ctx.plan, ctx.name, ctx.counts, ctx.segments
        dy = grad_output.contiguous()
        grad_input = None
        if ctx.needs_input_grad[0]:
            weight_q_t = ctx.weight_q_t or [plan.quantize(w, "weight", along="rows", name=name) for w in weight]
            grad_input = _fprop_grouped(plan, dy.to(x.dtype), "grad", weight_q_t, counts, segments, name, weight.shape[2])
        ctx.weight_q_t = None

        def compute() -> torch.Tensor:
            grad = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if not any(counts):
                return grad.to(weight.dtype)
            dy_q, bounds = quantize_along_tokens(plan, dy, "grad", segments, name)
            x_q, _ = quantize_along_tokens(plan, x, "activation", segments, name)
            for e, (start, stop) in enumerate(bounds):
                if stop > start:
                    grad[e] = plan.gemm(_columns(dy_q, start, stop), _columns(x_q, start, stop), torch.float32)
            return grad.to(weight.dtype)

        grad_weight = WGRAD.weight_gradient(weight, compute) if ctx.needs_input_grad[1] else None
        return grad_input, grad_weight, None, None, None, None


class FP8GroupedLinear(FP8LinearMixin, GroupedLinear):
    """A :class:`~megatron_dsv3.model.grouped_gemm.GroupedLinear` whose GEMMs run in block-wise FP8
    (``fp8`` None: the BF16 grouped GEMM, as the BF16 policy decides)."""

    def __init__(self, num_experts: int, input_size: int, output_size: int, *, config, **kwargs):
        super().__init__(num_experts, input_size, output_size, config=config, **kwargs)
        self._init_fp8(config, input_size, output_size)
        self.sources = None  # per expert, its tokens' per-source counts (set by FP8GroupedExperts)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        if self.fp8 is None:
            return grouped_linear(x, self.weight, tokens_per_expert)
        return _FP8GroupedLinearFunction.apply(x, self.weight, [int(c) for c in tokens_per_expert.tolist()],
                                               self.sources, self.fp8, self.fp8_name)


class FP8GroupedExperts(GroupedExperts):
    """The grouped experts with FP8 GEMMs; each knows its tokens' sources (:mod:`megatron_dsv3.fp8.segments`)."""

    linear_class = FP8GroupedLinear

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        TOKEN_SOURCES.wanted = True

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        self.linear_fc1.sources = self.linear_fc2.sources = TOKEN_SOURCES.take()
        try:
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        finally:
            self.linear_fc1.sources = self.linear_fc2.sources = None
