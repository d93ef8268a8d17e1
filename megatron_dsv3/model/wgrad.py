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
grad-ready hook adds it to ``main_grad`` and, with ``overlap_grad_reduce``, counts the weight as
ready, so its bucket starts reducing when its last ``W`` has run.  The hook also fires at the
deferring backward, for the weight that has no gradient yet (:meth:`WeightGradQueue.withholds`):
the run-time change ``deferred_weights_are_ready_at_their_w`` (:mod:`megatron_dsv3.runtime.ddp_changes`)
skips that call instead of letting Megatron assert.  Not deferring, these linears compute exactly
what Megatron's own local linears compute (``grad_output^T x``).

Transformer Engine's modules defer their weight GEMMs themselves when built with
``delay_wgrad_compute`` (every backward then queues them, per module, first in first out, and TE's
``backward_dw`` runs the oldest): the schedule queues a call of :func:`run_transformer_engine_wgrads`
in this queue for a deferring backward and makes it right away after any other
(:func:`transformer_engine_deferring` finds the modules).  Written against TE 2.x's
``WeightGradStore`` and Megatron-Core 0.19's wrappers; it needs a GPU with Transformer Engine and is
unverified until one runs it (``docs/dualpipe.md``).
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
        """Queue ``work`` (it gives a weight its gradient later); the module returns no weight gradient."""
        self._current.append(work)

    def weight_gradient(self, weight: torch.nn.Parameter, compute: Callable[[], torch.Tensor]):
        """What a backward returns for ``weight``: ``compute()`` now, or None inside a deferring
        backward, with ``compute`` queued to give ``weight`` its gradient at the ``W``."""
        if self.deferring and weight.requires_grad:
            self.put(lambda: _accumulate(weight, compute()))
            return None
        return compute()

    def withholds(self, param: torch.nn.Parameter) -> bool:
        """Whether ``param``'s gradient is being withheld: inside a deferring backward, a weight that
        autograd reaches without a gradient is one whose GEMM went into this queue (whatever queues
        here returns no weight gradient); its ``W`` gives it the gradient later."""
        return self.deferring and param.grad is None

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
        grad_weight = WGRAD.weight_gradient(weight, weight_grad)
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


def transformer_engine_deferring(model: torch.nn.Module) -> list:
    """The Transformer Engine modules of ``model`` whose weight GEMMs wait for ``backward_dw`` (built with
    ``delay_wgrad_compute``: TE's ``WeightGradStore`` says so); empty without Transformer Engine."""
    return [m for m in model.modules() if getattr(m, "wgrad_store", None) is not None and m.wgrad_store.delay_wgrad_compute()]


def run_transformer_engine_wgrads(modules: list) -> None:
    """Each module's oldest deferred weight GEMMs (TE's ``backward_dw``: the GEMMs, the gradient into
    ``main_grad`` or ``.grad``, then TE's wgrad hooks, where Megatron DDP counts the weight as ready).
    A module the backward did not reach has none waiting and is skipped (TE's own grouped linear
    checks the same)."""
    for module in modules:
        waiting = module.wgrad_store.context
        if waiting is not None and not waiting.empty():
            module.backward_dw()
