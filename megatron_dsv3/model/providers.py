"""Spec providers: where every module of the ``dsv3`` spec comes from (Megatron's ``BackendSpecProvider``).

The spec (:mod:`megatron_dsv3.model.spec`) builds every Linear from a provider: the MLA projections
(``linear()`` for the replicated down-projections, ``column_parallel_linear()`` /
``row_parallel_linear()`` for the rest), the dense MLP, the routed experts
(``grouped_mlp_modules()``), the shared experts and MTP's projection.  A different provider (FP8
linears, a deferred weight gradient) therefore swaps all of them at once; :func:`provider_for` is the
one place that chooses, from the backend or from the provider a config's options name
(:mod:`megatron_dsv3.model.options`; the FP8 provider is :mod:`megatron_dsv3.fp8.provider`).
Embedding, output head and router are not Linears of the spec: Megatron's ``GPTModel`` and
``TopKRouter`` build them, and they stay in BF16 (paper section 3.3).
"""

from __future__ import annotations

from functools import partial

from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_dsv3.model.attention import MLACoreAttention
from megatron_dsv3.model.grouped_experts import GroupedExperts
from megatron_dsv3.model.linear import DuplicatedLinear
from megatron_dsv3.model.norm import RMSNorm
from megatron_dsv3.model.options import options_of
from megatron_dsv3.model.wgrad import (
    DeferrableColumnParallelLinear,
    DeferrableDuplicatedLinear,
    DeferrableRowParallelLinear,
)
from megatron_dsv3.parallel.layout import DEEPSEEK_SCHEDULES
from megatron_dsv3.parallel.placement import placement_of


class DSV3LocalSpecProvider(LocalSpecProvider):
    """Megatron's local modules, with what DeepSeek-V3 needs on top.

    * ``layer_norm``: an RMSNorm that supports sequence parallelism (Megatron's local norm refuses it);
    * ``core_attention``: an attention that takes MLA's separate query/key and value head sizes;
    * ``linear``: a linear replicated on every tensor-parallel rank for MLA's down-projections, as
      Transformer Engine's spec does (Megatron's local spec splits them, which loses part of the
      rope-key gradient under TP, see :mod:`megatron_dsv3.model.linear`);
    * ``grouped_mlp_modules``: the routed experts, as Megatron's ``--moe-grouped-gemm`` asks (the
      config's ``moe_grouped_gemm``, set by ``--dsv3-experts``): ``grouped_experts``, one
      ``grouped_mm`` per projection for all local experts (:mod:`megatron_dsv3.model.grouped_experts`),
      or ``sequential_experts``, Megatron's ``SequentialMLP`` of this provider's own linears
      (Megatron's local provider ignores the flag and names its classes directly, so a subclass
      could not swap them).
    """

    sequential_experts: type = SequentialMLP
    grouped_experts: type = GroupedExperts

    def linear(self) -> type:
        return DuplicatedLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
        return RMSNorm

    def core_attention(self) -> type:
        return MLACoreAttention

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool):
        if moe_use_grouped_gemm:
            return self.grouped_experts
        return partial(
            self.sequential_experts,
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


def provider_for(config) -> BackendSpecProvider:
    """The provider for a config: the one its options name (FP8's, say: ``megatron_dsv3.model.options``),
    else the backend's (``config.transformer_impl``, already resolved).

    Under DeepSeek's schedules the local backend's linears can defer their weight gradient (the
    schedule's W, :mod:`megatron_dsv3.model.wgrad`); not deferring, they compute what Megatron's do.
    Transformer Engine's FP8 is Megatron's own (``--fp8-recipe blockwise``), on TE's provider.
    """
    chosen = options_of(config).provider
    if chosen is not None:
        return chosen()
    if config.transformer_impl == "local":
        if placement_of(config).schedule in DEEPSEEK_SCHEDULES:
            return DeferringLocalSpecProvider()
        return DSV3LocalSpecProvider()
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    return TESpecProvider()
