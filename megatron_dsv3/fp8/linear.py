"""Block-wise FP8 Linears for the local spec: Fprop, Dgrad and Wgrad all in FP8 (DeepSeek-V3 3.3).

For ``y = x W^T`` with ``x``: (tokens, K), ``W``: (N, K) and the incoming gradient ``dy``: (tokens, N):

=======  ======================  ==========================================  =====================
GEMM     computes                 operands (blocks along the GEMM's K)         torch._scaled_mm pair
=======  ======================  ==========================================  =====================
Fprop    ``y = x W^T``            ``x`` 1x128 per token; ``W`` 128x128          1x128 by 128x128
Dgrad    ``dx = dy W``            ``dy`` 1x128 per token; ``W^T``: the same     1x128 by 128x128
                                  128x128 blocks, transposed
Wgrad    ``dW = dy^T x``          ``dy^T`` and ``x^T`` re-quantised along       1x128 by 1x128
                                  tokens (128 tokens of one channel per tile)
=======  ======================  ==========================================  =====================

(with the recipe's default blocks; ``activation_block`` / ``weight_block`` / ``grad_block`` may make
any of them 2-D).  The FP8 codes come from the one quantizer, the GEMM from the plan's backend
(emulated or ``torch._scaled_mm``).  Tensor-parallel communication is Megatron's (sequence-parallel
gather of the input, reduce-scatter or all-reduce of the input gradient), as in
:mod:`megatron_dsv3.model.wgrad`; while the zero-bubble queue (``WGRAD``) is deferring, the weight
GEMM is queued there instead of run, so DualPipe's W applies to FP8 Linears too.

Tiles along tokens restart at every token segment the experts report
(:mod:`megatron_dsv3.fp8.segments`): an expert's input concatenates tokens from several
expert-parallel ranks, and tiles that spanned two ranks' tokens would make the weight gradient
depend on the parallel layout.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import _gather_along_first_dim, _reduce_scatter_along_first_dim

from megatron_dsv3.fp8.plan import FP8Plan, plan_of
from megatron_dsv3.fp8.segments import current_segments
from megatron_dsv3.model.wgrad import (
    WGRAD,
    DeferrableColumnParallelLinear,
    DeferrableDuplicatedLinear,
    DeferrableRowParallelLinear,
)


def _split(t: torch.Tensor, segments):
    return [t] if not segments else [p for p in torch.split(t, list(segments)) if p.shape[0]]


def _fprop_like(plan: FP8Plan, rows: torch.Tensor, role: str, b, segments, name: str) -> torch.Tensor:
    """``rows @ b^T`` with ``rows`` (tokens, K) quantised for ``role``; 2-D blocks never span two segments."""
    if plan.recipe.block(role)[0] == 1:
        return plan.gemm(plan.quantize(rows, role, name=name), b, rows.dtype)
    pieces = [plan.gemm(plan.quantize(p, role, name=name), b, rows.dtype) for p in _split(rows, segments)]
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def weight_grad(plan: FP8Plan, dy: torch.Tensor, x: torch.Tensor, segments=None, name: str = "") -> torch.Tensor:
    """``dy^T x`` in FP8 with both operands tiled along tokens, one GEMM per token segment, fp32."""
    out = None
    for dy_s, x_s in zip(_split(dy, segments), _split(x, segments)):
        part = plan.gemm(plan.quantize(dy_s, "grad", along="rows", name=name),
                         plan.quantize(x_s, "activation", along="rows", name=name), torch.float32)
        out = part if out is None else out + part
    if out is None:  # no tokens at all (an expert that received none)
        out = torch.zeros(dy.shape[1], x.shape[1], dtype=torch.float32, device=dy.device)
    return out


class _FP8Linear(torch.autograd.Function):
    """``y = x W^T + b`` in block-wise FP8 with Megatron's tensor-parallel communication."""

    @staticmethod
    def forward(ctx, input, weight, bias, plan, name, allreduce_dgrad, sequence_parallel, tp_group):
        total = _gather_along_first_dim(input, group=tp_group) if sequence_parallel else input
        segments = current_segments()
        rows = total.reshape(-1, total.shape[-1])
        weight_q = plan.quantize(weight, "weight", name=name)
        output = _fprop_like(plan, rows, "activation", weight_q, segments, name).view(*total.shape[:-1], weight.shape[0])
        ctx.save_for_backward(input, weight)
        # 2-D weight blocks serve Dgrad transposed; 1-D tiles must be re-cut along N there.
        ctx.weight_q_t = weight_q.t() if plan.recipe.block("weight")[0] > 1 else None
        ctx.plan, ctx.name, ctx.segments, ctx.use_bias = plan, name, segments, bias is not None
        ctx.allreduce_dgrad, ctx.sequence_parallel, ctx.tp_group = allreduce_dgrad, sequence_parallel, tp_group
        return output + bias if bias is not None else output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        plan, name, segments, tp_group = ctx.plan, ctx.name, ctx.segments, ctx.tp_group
        dy = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = None
        if ctx.needs_input_grad[0]:
            weight_q_t = ctx.weight_q_t
            if weight_q_t is None:
                weight_q_t = plan.quantize(weight, "weight", along="rows", name=name)
            shape = (*grad_output.shape[:-1], weight.shape[1])
            grad_input = _fprop_like(plan, dy.to(input.dtype), "grad", weight_q_t, segments, name).view(shape)
            if ctx.sequence_parallel:
                grad_input = _reduce_scatter_along_first_dim(grad_input, group=tp_group)
            elif ctx.allreduce_dgrad:
                torch.distributed.all_reduce(grad_input, group=tp_group)
        ctx.weight_q_t = None

        def compute() -> torch.Tensor:
            total = _gather_along_first_dim(input, group=tp_group) if ctx.sequence_parallel else input
            rows = total.reshape(-1, total.shape[-1])
            return weight_grad(plan, dy, rows, segments, name).to(weight.dtype)

        grad_weight = WGRAD.weight_gradient(weight, compute) if ctx.needs_input_grad[1] else None
        grad_bias = dy.sum(dim=0) if ctx.use_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


class FP8LinearMixin:
    """What every FP8 Linear shares: its plan (None: this module stays in BF16, see
    :mod:`megatron_dsv3.fp8.policy`) and a name for error messages."""

    fp8: FP8Plan | None
    fp8_name: str

    def _init_fp8(self, config, input_size: int, output_size: int) -> None:
        self.fp8 = plan_of(config)
        if self.fp8 is None or not self.fp8.runs_local_linears:
            raise ValueError("an FP8 Linear was built from a config without a local FP8 plan; give the"
                             " config megatron_dsv3.fp8.provider.model_options(plan) (attach it with"
                             " megatron_dsv3.model.options.attach_options)")
        self.fp8_name = f"{type(self).__name__}({input_size}->{output_size})"

    def _fp8_apply(self, input, weight, bias, allreduce_dgrad, sequence_parallel, tp_group):
        return _FP8Linear.apply(input, weight, bias, self.fp8, self.fp8_name, allreduce_dgrad,
                                sequence_parallel, tp_group)


def _check_kwargs(kwargs: dict) -> None:
    unsupported = {
        "gradient_accumulation_fusion": kwargs.get("gradient_accumulation_fusion"),
        "grad_output_buffer": kwargs.get("grad_output_buffer") is not None,
        "gtp_remat_size > 1": (kwargs.get("gtp_remat_size") or 1) > 1,
    }
    used = [name for name, on in unsupported.items() if on]
    if used:
        raise NotImplementedError(f"FP8 Linears of the local backend do not support {', '.join(used)}:"
                                  " use --no-gradient-accumulation-fusion (the local backend's default)")


class _ParallelFP8(FP8LinearMixin):
    def __init__(self, input_size, output_size, *args, config, **kwargs):
        super().__init__(input_size, output_size, *args, config=config, **kwargs)
        self._init_fp8(config, input_size, output_size)

    def _forward_impl(self, input, weight, *args, **kwargs):
        if self.fp8 is None or args:
            return super()._forward_impl(input, weight, *args, **kwargs)
        _check_kwargs(kwargs)
        return self._fp8_apply(input, weight, kwargs.get("bias"), bool(kwargs.get("allreduce_dgrad")),
                               bool(kwargs.get("sequence_parallel")), kwargs.get("tp_group"))


class FP8ColumnParallelLinear(_ParallelFP8, DeferrableColumnParallelLinear):
    """Megatron's ``ColumnParallelLinear`` with its three GEMMs in block-wise FP8."""


class FP8RowParallelLinear(_ParallelFP8, DeferrableRowParallelLinear):
    """Megatron's ``RowParallelLinear`` with its three GEMMs in block-wise FP8."""


class FP8DuplicatedLinear(FP8LinearMixin, DeferrableDuplicatedLinear):
    """MLA's replicated down-projection with its three GEMMs in block-wise FP8."""

    def __init__(self, input_size, output_size, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self._init_fp8(config, input_size, output_size)

    def forward(self, x: torch.Tensor):
        if self.fp8 is None:
            return super().forward(x)
        return self._fp8_apply(x, self.weight, None, False, False, None), None
