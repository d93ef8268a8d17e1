"""The FP8 spec provider: every Linear of the ``dsv3`` spec in block-wise FP8 (DeepSeek-V3 section 3.3).

A config whose options name this provider (:func:`megatron_dsv3.fp8.provider.model_options`, attached
where the arguments become a config) gets MLA's projections, the dense MLP, the shared experts, MTP's
projection and the routed experts from :mod:`megatron_dsv3.fp8.linear` and
:mod:`megatron_dsv3.fp8.experts`; each can defer its weight GEMM (DualPipe's W).  The embedding, output
head, router, norms and core attention are not Linears of the spec and stay BF16.
"""

from __future__ import annotations

from megatron_dsv3.fp8.experts import FP8GroupedExperts, FP8SequentialMLP
from megatron_dsv3.fp8.linear import FP8ColumnParallelLinear, FP8DuplicatedLinear, FP8RowParallelLinear
from megatron_dsv3.fp8.plan import FP8Plan
from megatron_dsv3.fp8.policy import keep_bf16_modules
from megatron_dsv3.model.options import ModelOptions
from megatron_dsv3.model.providers import DeferringLocalSpecProvider


class FP8LocalSpecProvider(DeferringLocalSpecProvider):
    """The local backend's provider with FP8 Linears and FP8 routed experts (grouped: the tokens of all
    experts quantised at once, then one FP8 GEMM per expert, since PyTorch has no block-wise FP8
    grouped GEMM; sequential: Megatron's ``SequentialMLP`` of FP8 Linears)."""

    sequential_experts = FP8SequentialMLP
    grouped_experts = FP8GroupedExperts

    def column_parallel_linear(self) -> type:
        return FP8ColumnParallelLinear

    def row_parallel_linear(self) -> type:
        return FP8RowParallelLinear

    def linear(self) -> type:
        return FP8DuplicatedLinear


def model_options(plan: FP8Plan | None) -> ModelOptions | None:
    """The options a config carries for ``plan`` (None without FP8): with a plan our Linears run
    (``pytorch``, ``emulated``), this provider and the BF16 policy; with Transformer Engine's, the
    plan alone (Megatron's TE modules run it; ``runtime.model_changes`` hands TE the recipe)."""
    if plan is None:
        return None
    if not plan.runs_local_linears:
        return ModelOptions(fp8_plan=plan)
    return ModelOptions(provider=FP8LocalSpecProvider, pre_wrap_hooks=(keep_bf16_modules,), fp8_plan=plan)
