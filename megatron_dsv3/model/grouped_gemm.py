"""One GEMM for every routed expert of a rank: ``torch.nn.functional.grouped_mm``, with a weight
gradient that can wait (DualPipe's W).

The dispatcher hands an expert-parallel rank its tokens sorted by local expert, ``x``: (T, K), with
``c_e`` tokens for expert ``e`` (offsets ``o_e = c_0 + ... + c_e``); a :class:`GroupedLinear` keeps
the weights of its ``E`` experts stacked, ``W``: (E, N, K), each ``W_e`` what Megatron's
``ColumnParallelLinear`` / ``RowParallelLinear`` of expert ``e`` would hold on this rank.  Its three
GEMMs are one call each, whatever the number of experts:

=======  ===============================  =================================  ==============
GEMM     computes, for every expert e      ``grouped_mm``                     operand forms
=======  ===============================  =================================  ==============
Fprop    ``y_e = x_e W_e^T``               ``grouped_mm(x, W^T, offs=o)``     2-D by 3-D
Dgrad    ``dx_e = dy_e W_e``               ``grouped_mm(dy, W, offs=o)``      2-D by 3-D
Wgrad    ``dW_e = dy_e^T x_e``             ``grouped_mm(dy^T, x, offs=o)``    2-D by 2-D
=======  ===============================  =================================  ==============

These are the products Megatron's local linears compute per expert (``SequentialMLP``), in the
same forms; on the CPU ``grouped_mm`` in fp32 equals them bit for bit (``tests/test_grouped_experts.py``).
While :data:`~megatron_dsv3.model.wgrad.WGRAD` is deferring, the Wgrad call is queued, so the
zero-bubble split of DualPipe(V) applies to the grouped weights as to every other linear.

Details that bite (PyTorch's ``aten/src/ATen/native/GroupedMMUtils.h``; pytorch#172439):

* offsets are int32 on the operands' device; leading strides must be multiples of 16 bytes, and a
  stride-0 gradient (``y.sum().backward()``) is refused ("Invalid strides/sizes"), so the incoming
  gradient is made contiguous;
* the weight gradient of an expert that received no tokens must be zero; the CUDA kernels allocate
  the output uninitialised and write no block for an empty group (SM90's and SM100's alike), so
  empty experts' gradients are zeroed explicitly;
* ``grouped_mm`` is public from PyTorch 2.10 and runs fp32 and bf16 on the CPU; on a GPU its fast
  kernels take bf16 on SM 9.0/10.0 (other dtypes or GPUs take PyTorch's per-group loop, said once
  in a warning); where it is missing the experts refuse to build (:func:`require_grouped_mm`).
"""

from __future__ import annotations

import warnings

import torch
from megatron.core.tensor_parallel.layers import (
    _initialize_affine_weight_cpu,
    _initialize_affine_weight_gpu,
    set_tensor_model_parallel_attributes,
)

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.model.backends import grouped_mm_status
from megatron_dsv3.model.wgrad import WGRAD

_WARNED: set = set()


def require_grouped_mm() -> None:
    """Raise the explanatory error where ``torch.nn.functional.grouped_mm`` cannot run."""
    usable, reason = grouped_mm_status(on_cpu=not torch.cuda.is_available())
    if not usable:
        raise ConfigError(f"grouped experts cannot run here: {reason}",
                          fix="use --dsv3-experts sequential (recipe model.experts: sequential), or a PyTorch"
                          " and GPU that have torch.nn.functional.grouped_mm", key="--dsv3-experts")


def _warn_slow_path_once(x: torch.Tensor) -> None:
    """Say once per device and dtype when ``grouped_mm`` will take PyTorch's per-group fallback loop."""
    if not x.is_cuda:
        return
    capability = torch.cuda.get_device_capability(x.device)
    key = (capability, x.dtype)
    if key in _WARNED or (x.dtype == torch.bfloat16 and tuple(capability) in ((9, 0), (10, 0))):
        return
    _WARNED.add(key)
    warnings.warn(f"megatron-dsv3: grouped experts in {x.dtype} on compute capability {capability[0]}.{capability[1]}"
                  " run PyTorch's per-expert fallback of grouped_mm (its fast kernels take bf16 on SM90/SM100),"
                  " no faster than --dsv3-experts sequential; train in bf16 (--bf16) on Hopper or Blackwell",
                  RuntimeWarning, stacklevel=3)


def offsets_of(tokens_per_expert: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The int32 end offsets ``grouped_mm`` takes, on ``device`` (no host synchronisation)."""
    return tokens_per_expert.to(device=device, non_blocking=True).cumsum(0).to(torch.int32)


def zero_empty_experts(grad: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """``grad`` (E, N, K) with the experts that received no tokens set to exactly zero."""
    if tokens_per_expert.device.type == "cpu":
        empty = (tokens_per_expert == 0).nonzero().flatten()
        return grad.index_fill_(0, empty.to(grad.device), 0) if empty.numel() else grad
    return torch.where((tokens_per_expert == 0).to(grad.device)[:, None, None], torch.zeros_like(grad), grad)


class _GroupedLinearFunction(torch.autograd.Function):
    """``y_e = x_e W_e^T`` for every expert in one ``grouped_mm``; the Wgrad may be deferred."""

    @staticmethod
    def forward(ctx, x, weight, offsets, tokens_per_expert):
        ctx.save_for_backward(x, weight, offsets)
        ctx.tokens_per_expert = tokens_per_expert
        return torch.nn.functional.grouped_mm(x, weight.transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, offsets = ctx.saved_tensors
        dy = grad_output.contiguous()
        grad_input = torch.nn.functional.grouped_mm(dy, weight, offs=offsets) if ctx.needs_input_grad[0] else None
        tokens_per_expert = ctx.tokens_per_expert

        def weight_grad() -> torch.Tensor:
            grad = torch.nn.functional.grouped_mm(dy.t(), x, offs=offsets)
            return zero_empty_experts(grad, tokens_per_expert)

        grad_weight = WGRAD.weight_gradient(weight, weight_grad) if ctx.needs_input_grad[1] else None
        return grad_input, grad_weight, None, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """``x_e W_e^T`` for every expert ``e`` of the stacked ``weight`` (E, N, K); ``x``: (T, K) sorted
    by expert, ``tokens_per_expert``: (E,) counts (any device)."""
    _warn_slow_path_once(x)
    return _GroupedLinearFunction.apply(x, weight, offsets_of(tokens_per_expert, x.device), tokens_per_expert)


class GroupedLinear(torch.nn.Module):
    """The same linear of every local expert, its weights stacked: ``weight`` is (E, N, K).

    ``parallel`` is ``"column"`` (Megatron's ``ColumnParallelLinear``: N split over the expert
    tensor-parallel group, ``stride`` 2 for SwiGLU's [gate; up] rows) or ``"row"``
    (``RowParallelLinear``: K split).  Each expert's slice is initialised exactly as Megatron's
    parallel linear of that expert would be (same functions, same random draws in the same order
    as ``SequentialMLP``'s experts when :func:`init_expert_weights` interleaves fc1 and fc2), and
    the parameter carries Megatron's tensor-parallel and expert attributes.  No communication:
    the token dispatcher does the experts' (Megatron's ``explicit_expert_comm``).
    """

    def __init__(self, num_experts: int, input_size: int, output_size: int, *, config, parallel: str,
                 tp_size: int, tp_rank: int, init_method, stride: int = 1):
        super().__init__()
        if parallel not in ("column", "row"):
            raise ValueError(f"parallel must be 'column' or 'row', got {parallel!r}")
        self.parallel, self.tp_size, self.tp_rank, self.stride = parallel, tp_size, tp_rank, stride
        self.input_size, self.output_size, self.init_method = input_size, output_size, init_method
        self.partition_dim = 0 if parallel == "column" else 1  # of one expert's (N, K) weight
        n = output_size // tp_size if parallel == "column" else output_size
        k = input_size // tp_size if parallel == "row" else input_size
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.empty(num_experts, n, k, dtype=config.params_dtype, device=device))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=self.partition_dim + 1, stride=stride)
        use_expert_groups = (config.expert_model_parallel_size > 1
                             or config.expert_tensor_parallel_size != config.tensor_model_parallel_size)
        setattr(self.weight, "allreduce", not use_expert_groups)
        self.config = config

    def init_expert(self, e: int) -> None:
        """Initialise expert ``e``'s slice as Megatron's parallel linear would (CPU or GPU path)."""
        view = self.weight.data[e]
        if self.config.use_cpu_initialization:
            _initialize_affine_weight_cpu(
                view, self.output_size, self.input_size, view.shape[self.partition_dim], self.partition_dim,
                self.init_method, stride=self.stride, rank=self.tp_rank, world_size=self.tp_size,
                skip_set_tensor_parallel_attributes=True,
                **({"params_dtype": self.config.params_dtype} if self.parallel == "row" else {}))
        else:
            _initialize_affine_weight_gpu(view, self.init_method, partition_dim=self.partition_dim,
                                          stride=self.stride, is_expert=True)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        return grouped_linear(x, self.weight, tokens_per_expert)

    def extra_repr(self) -> str:
        e, n, k = self.weight.shape
        return f"experts={e}, in={k}, out={n}, parallel={self.parallel}, tp={self.tp_size}"


def init_expert_weights(linears: list[GroupedLinear], num_experts: int) -> None:
    """Initialise every expert's slices, expert by expert and linear by linear (fc1 then fc2 of
    expert 0, then of expert 1, ...): the order, hence the random draws, of ``SequentialMLP``."""
    with torch.no_grad():
        for e in range(num_experts):
            for linear in linears:
                linear.init_expert(e)
