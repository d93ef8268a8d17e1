"""Linears whose weight gradient can wait: the zero-bubble split of a backward into B and W.

ZeroBubble (Qi et al., 2023) and DualPipe (arXiv 2412.19437v2, section 3.2.1) run a linear layer's
weight-gradient GEMM later than its input-gradient GEMM, to fill pipeline bubbles.  The model owns
the capability (as Transformer Engine's modules own ``delay_wgrad_compute``); the schedule
(:mod:`megatron_dsv3.pipeline.runner`) decides when: while :data:`WGRAD` is deferring (a ``z``
backward), every linear built from :class:`megatron_dsv3.model.providers.DeferringLocalSpecProvider` returns its input gradient
and queues its weight GEMM, and a ``W`` operation runs the oldest queued backward's GEMMs (first in,
first out, as DeepSeek's reference).  An FP8 linear can queue its weight GEMM in the same queue.

A deferred weight gradient reaches the parameter through autograd itself (a backward on the leaf
parameter with the computed gradient), so it lands where an undeferred one would: Megatron DDP's
grad-ready hook adds it to ``main_grad``; the distributed optimizer sees the same buffers.  The
hook also fires at the deferring backward, for the weight that has no gradient yet: without
``overlap_grad_reduce`` it skips it, with it Megatron asserts, so that combination is refused
(``pipeline/constraints.py``; making the deferring backward hand DDP a zero gradient would allow it,
not done).  Not deferring,
these linears compute exactly what Megatron's own local linears compute (``grad_output^T x``).

Transformer Engine defers its weight gradients with its own ``delay_wgrad_compute``; that path needs
a GPU and is not wired here (see ``docs/dualpipe.md``).
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Callable

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import _gather_along_first_dim, _reduce_scatter_along_first_dim

from megatron_dsv3.model.linear import DuplicatedLinear


class WeightGradQueue:
    """Deferred weight-gradient work, one entry per deferring backward, first in first out."""

    def __init__(self):
        self.deferring = False
        self._current: list[Callable[[], None]] = []
        self._entries: deque[list[Callable[[], None]]] = deque()

    @contextlib.contextmanager
    def defer(self):
        """Run a backward with its weight GEMMs queued as one entry (a later :meth:`pop` runs them)."""
        self.deferring, self._current = True, []
        try:
            yield
        finally:
            self.deferring = False
            self._entries.append(self._current)
            self._current = []

    def put(self, work: Callable[[], None]) -> None:
        self._current.append(work)

    def pop(self) -> None:
        """Run the oldest entry's weight GEMMs."""
        if not self._entries:
            raise RuntimeError("no deferred weight gradient to compute (the schedule's W has no B)")
        for work in self._entries.popleft():
            work()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self.deferring, self._current = False, []
        self._entries.clear()


WGRAD = WeightGradQueue()


def _accumulate(param: torch.nn.Parameter, grad: torch.Tensor) -> None:
    """Give ``param`` its gradient through autograd, so its AccumulateGrad hooks (DDP's) fire."""
    torch.autograd.backward(param, grad_tensors=grad)


class _LinearWithDeferrableWgrad(torch.autograd.Function):
    """``y = x W^T + b`` with Megatron's tensor-parallel communication, whose weight GEMM can wait.

    ``sequence_parallel``: the input is gathered along the sequence in the forward and the input
    gradient reduce-scattered in the backward (the input is re-gathered for the weight GEMM, as
    Megatron does, rather than kept gathered).  ``allreduce_dgrad``: the input gradient is summed
    over the tensor-parallel group.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, allreduce_dgrad, sequence_parallel, tp_group):
        ctx.save_for_backward(input, weight)
        ctx.use_bias = bias is not None
        ctx.allreduce_dgrad, ctx.sequence_parallel, ctx.tp_group = allreduce_dgrad, sequence_parallel, tp_group
        total = _gather_along_first_dim(input, group=tp_group) if sequence_parallel else input
        output = torch.matmul(total, weight.t())
        return output + bias if bias is not None else output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        sequence_parallel, tp_group = ctx.sequence_parallel, ctx.tp_group
        grad_input = grad_output.matmul(weight)
        if sequence_parallel:
            grad_input = _reduce_scatter_along_first_dim(grad_input, group=tp_group)
        elif ctx.allreduce_dgrad:
            torch.distributed.all_reduce(grad_input, group=tp_group)

        def weight_grad() -> torch.Tensor:
            total = _gather_along_first_dim(input, group=tp_group) if sequence_parallel else input
            go = grad_output.reshape(-1, grad_output.shape[-1])
            return go.t().matmul(total.reshape(-1, total.shape[-1]))

        grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(dim=0) if ctx.use_bias else None
        if WGRAD.deferring and weight.requires_grad:
            WGRAD.put(lambda: _accumulate(weight, weight_grad()))
            grad_weight = None
        else:
            grad_weight = weight_grad()
        return grad_input, grad_weight, grad_bias, None, None, None


def _deferrable_forward_impl(module, parent, input, weight, *args, **kwargs):
    """``_forward_impl`` of Megatron's parallel linears through :class:`_LinearWithDeferrableWgrad`."""
    if not weight.requires_grad:
        return parent._forward_impl(module, input, weight, *args, **kwargs)
    unsupported = {
        "gradient_accumulation_fusion": kwargs.get("gradient_accumulation_fusion"),
        "grad_output_buffer": kwargs.get("grad_output_buffer") is not None,
        "gtp_remat_size > 1": (kwargs.get("gtp_remat_size") or 1) > 1,
    }
    used = [name for name, on in unsupported.items() if on]
    if used or args:
        raise NotImplementedError(
            f"the deferred weight gradient of the local backend does not support {', '.join(used) or 'these arguments'}"
            " (DualPipe's zero-bubble split): use --no-gradient-accumulation-fusion and no embedding wgrad deferral"
        )
    return _LinearWithDeferrableWgrad.apply(input, weight, kwargs.get("bias"), bool(kwargs.get("allreduce_dgrad")),
                                           bool(kwargs.get("sequence_parallel")), kwargs.get("tp_group"))


class DeferrableColumnParallelLinear(ColumnParallelLinear):
    """Megatron's ``ColumnParallelLinear`` whose weight gradient the schedule can defer."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        return _deferrable_forward_impl(self, ColumnParallelLinear, input, weight, *args, **kwargs)


class DeferrableRowParallelLinear(RowParallelLinear):
    """Megatron's ``RowParallelLinear`` whose weight gradient the schedule can defer."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        return _deferrable_forward_impl(self, RowParallelLinear, input, weight, *args, **kwargs)


class DeferrableDuplicatedLinear(DuplicatedLinear):
    """The replicated MLA down-projection whose weight gradient the schedule can defer."""

    def forward(self, x: torch.Tensor):
        return _LinearWithDeferrableWgrad.apply(x, self.weight, None, False, False, None), None
