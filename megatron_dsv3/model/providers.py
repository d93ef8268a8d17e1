"""Spec providers: where every module of the ``dsv3`` spec comes from (Megatron's ``BackendSpecProvider``).

The spec (:mod:`megatron_dsv3.model.spec`) builds every Linear from a provider: the MLA projections
(``linear()`` for the replicated down-projections, ``column_parallel_linear()`` /
``row_parallel_linear()`` for the rest), the dense MLP, the routed experts
(``grouped_mlp_modules()``), the shared experts and MTP's projection.  A different provider (FP8
linears, a deferred weight gradient) therefore swaps all of them at once; :func:`provider_for` is the
one place that chooses.  Embedding, output head and router are not Linears of the spec: Megatron's
``GPTModel`` and ``TopKRouter`` build them, and they stay in BF16 (paper section 3.3).
"""

from __future__ import annotations

from functools import partial

from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_dsv3.fp8.experts import FP8SequentialMLP
from megatron_dsv3.fp8.linear import FP8ColumnParallelLinear, FP8DuplicatedLinear, FP8RowParallelLinear
from megatron_dsv3.fp8.plan import plan_of
from megatron_dsv3.model.attention import MLACoreAttention
from megatron_dsv3.model.linear import DuplicatedLinear
from megatron_dsv3.model.norm import RMSNorm
from megatron_dsv3.model.wgrad import (
    DeferrableColumnParallelLinear,
    DeferrableDuplicatedLinear,
    DeferrableRowParallelLinear,
)
from megatron_dsv3.parallel.placement import DEEPSEEK_SCHEDULES, placement_of


class DSV3LocalSpecProvider(LocalSpecProvider):
    """Megatron's local modules, with what DeepSeek-V3 needs on top.

    * ``layer_norm``: an RMSNorm that supports sequence parallelism (Megatron's local norm refuses it);
    * ``core_attention``: an attention that takes MLA's separate query/key and value head sizes;
    * ``linear``: a linear replicated on every tensor-parallel rank for MLA's down-projections, as
      Transformer Engine's spec does (Megatron's local spec splits them, which loses part of the
      rope-key gradient under TP, see :mod:`megatron_dsv3.model.linear`);
    * ``grouped_mlp_modules``: the routed experts from this provider's own linears (Megatron's local
      provider names its classes directly, so a subclass could not swap them).
    """

    def linear(self) -> type:
        return DuplicatedLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
        return RMSNorm

    def core_attention(self) -> type:
        return MLACoreAttention

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool):
        return partial(
            SequentialMLP,
            submodules=MLPSubmodules(
                linear_fc1=self.column_parallel_linear(),
                linear_fc2=self.row_parallel_linear(),
                activation_func=self.activation_func(),
            ),
        )


class DeferringLocalSpecProvider(DSV3LocalSpecProvider):
    """The local backend with every spec Linear able to defer its weight gradient (DualPipe's W)."""

    def column_parallel_linear(self) -> type:
        return DeferrableColumnParallelLinear

    def row_parallel_linear(self) -> type:
        return DeferrableRowParallelLinear

    def linear(self) -> type:
        return DeferrableDuplicatedLinear


# ---- FP8 (megatron_dsv3.fp8) ----
class FP8LocalSpecProvider(DeferringLocalSpecProvider):
    """The local backend with every spec Linear in block-wise FP8 (DeepSeek-V3 section 3.3).

    MLA's projections, the dense MLP, the shared experts, MTP's projection and the routed experts
    (one FP8 GEMM per expert: PyTorch has no block-wise FP8 grouped GEMM) all come from
    :mod:`megatron_dsv3.fp8.linear`; each can defer its weight GEMM (DualPipe's W).  The embedding,
    output head, router, norms and core attention are not Linears of the spec and stay BF16.
    """

    def column_parallel_linear(self) -> type:
        return FP8ColumnParallelLinear

    def row_parallel_linear(self) -> type:
        return FP8RowParallelLinear

    def linear(self) -> type:
        return FP8DuplicatedLinear

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool):
        return partial(
            FP8SequentialMLP,
            submodules=MLPSubmodules(
                linear_fc1=self.column_parallel_linear(),
                linear_fc2=self.row_parallel_linear(),
                activation_func=self.activation_func(),
            ),
        )


def provider_for(config) -> BackendSpecProvider:
    """The provider for a config's backend (``config.transformer_impl``, already resolved).

    Under DeepSeek's schedules the local backend's linears can defer their weight gradient (the
    schedule's W, :mod:`megatron_dsv3.model.wgrad`); not deferring, they compute what Megatron's do.
    With an FP8 plan for the local backend (:mod:`megatron_dsv3.fp8.plan`) every Linear is FP8;
    Transformer Engine's FP8 is Megatron's own (``--fp8-recipe blockwise``), on TE's provider.
    """
    plan = plan_of(config)
    if config.transformer_impl == "local" and plan is not None and plan.runs_local_linears:
        return FP8LocalSpecProvider()
    if config.transformer_impl == "local":
        if placement_of(config).schedule in DEEPSEEK_SCHEDULES:
            return DeferringLocalSpecProvider()
        return DSV3LocalSpecProvider()
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    return TESpecProvider()
