"""Run-time changes applied whenever a ``dsv3`` spec is built (group ``model``)."""

from __future__ import annotations

from megatron_dsv3.fp8.plan import plan_of
from megatron_dsv3.fp8.segments import TOKEN_SOURCES
from megatron_dsv3.fp8.te import float8_block_scaling
from megatron_dsv3.runtime.registry import megatron_change, original, replace

_RESOLVER = "megatron.core.transformer.mla_qk_norm_config.QKNormConfigResolver._resolve_mla_qk_layernorm"


@megatron_change(
    targets=[_RESOLVER],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="QKNormConfigResolver._resolve_mla_qk_layernorm keeps linear_q_proj a plain "
    "linear when q_lora_rank is None",
)
def uncompressed_query_has_no_extra_norm():
    """MLA without query compression (``q_lora_rank=None``, DeepSeek-V2-Lite) gets no query norm.

    DeepSeek-V2-Lite projects queries straight from the normalised hidden state (``q = W_q h``);
    only the compressed key/value latent is normalised.  With ``qk_layernorm=True`` (needed for that
    kv norm) Megatron-Core 0.19 swaps ``linear_q_proj`` for a fused norm+linear, which adds a second,
    learnable RMSNorm in front of the query projection under Transformer Engine and fails outright
    ("qk_layernorm requires TransformerEngine ...") on the local backend.  The replacement keeps the
    spec's plain ``linear_q_proj`` when there is no ``q_lora_rank``; every other case is unchanged.
    """
    resolve = original(_RESOLVER)

    def _resolve_mla_qk_layernorm(self):
        if self.has_q_lora:
            return resolve(self)
        from megatron.core.transformer.identity_op import IdentityOp

        kv_norm = self.submodules.kv_layernorm or IdentityOp
        if self._is_trivial(kv_norm):
            linear_kv_up_proj = self._mla_fused_linear_or_default(
                self.submodules.linear_kv_up_proj, "linear_kv_up_proj"
            )
        else:
            linear_kv_up_proj = self._non_fused_or_default(
                self.submodules.linear_kv_up_proj, "linear_kv_up_proj"
            )
        return self._result(
            linear_q_proj=self._non_fused_or_default(self.submodules.linear_q_proj, "linear_q_proj"),
            linear_q_up_proj=IdentityOp,
            linear_kv_up_proj=linear_kv_up_proj,
            q_layernorm=IdentityOp,
            kv_layernorm=kv_norm,
        )

    replace(_RESOLVER, _resolve_mla_qk_layernorm)


@megatron_change(
    targets=["megatron.core.transformer.multi_latent_attention.MLASelfAttention.__init__"],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="MLASelfAttention accepts any replicated linear for its down-projections, not "
    "only the classes in its fixed list (TELinear, ModelOpt's Linear, column-parallel linears)",
)
def mla_accepts_replicated_down_projections():
    """MLA accepts a down-projection class its spec provider marks as replicated over TP.

    ``MLASelfAttention.__init__`` builds ``linear_q_down_proj`` / ``linear_kv_down_proj`` only from a
    fixed list of classes, compared by identity (``TELinear``; ``Linear``, ``TEColumnParallelLinear``,
    ``ColumnParallelLinear``) and raises ``Unsupported linear_q_down_proj`` for anything else.  The
    ``dsv3`` spec takes its down-projections from its provider (``provider.linear()``), so an FP8 or
    deferred-weight-gradient provider can swap them: the local backend's is ``DuplicatedLinear``,
    replicated on every tensor-parallel rank as Transformer Engine's spec does (see
    ``megatron_dsv3/model/linear.py`` for the gradient bug of the column-split alternative).  While
    an ``MLASelfAttention`` whose down-projection classes carry ``replicated_over_tensor_parallel``
    is being built, the list's ``Linear`` entry names that class (its kwargs, ``gather_output=False``
    and no TP group, are what a replicated linear needs); afterwards the module's name is restored.
    Down-projections Megatron knows are built exactly as before.
    """
    from megatron.core.transformer import multi_latent_attention

    init = original("megatron.core.transformer.multi_latent_attention.MLASelfAttention.__init__")

    def __init__(self, config, submodules, *args, **kwargs):
        replicated = {
            cls for cls in (submodules.linear_q_down_proj, submodules.linear_kv_down_proj)
            if getattr(cls, "replicated_over_tensor_parallel", False)
        }
        if not replicated:
            return init(self, config, submodules, *args, **kwargs)
        if len(replicated) > 1:
            raise TypeError(f"the q and kv down-projections must be one replicated class, got {replicated}")
        saved = multi_latent_attention.Linear
        multi_latent_attention.Linear = replicated.pop()
        try:
            return init(self, config, submodules, *args, **kwargs)
        finally:
            multi_latent_attention.Linear = saved

    replace("megatron.core.transformer.multi_latent_attention.MLASelfAttention.__init__", __init__)


@megatron_change(
    targets=["megatron.core.transformer.moe.moe_utils.MoEAuxLossAutoScaler.set_loss_scale"],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="MoEAuxLossAutoScaler.backward's default scale has the schedule's shape [1]",
)
def moe_aux_loss_scale_keeps_any_shape():
    """The MoE auxiliary-loss scale can be set after a backward that ran outside the schedule.

    A backward through an MoE layer outside Megatron's pipeline schedule (a model called directly,
    as a test or a custom loop does) leaves ``MoEAuxLossAutoScaler.main_loss_backward_scale`` as a
    0-dim tensor; the schedules then set a 1-element scale with ``copy_``, which fails ("output
    with shape [] doesn't match the broadcast shape [1]").  The replacement copies when the shapes
    agree and otherwise stores the new scale, which is what the next backward reads either way.
    """
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    def set_loss_scale(scale):
        current = MoEAuxLossAutoScaler.main_loss_backward_scale
        if current is None or current.shape != scale.shape:
            MoEAuxLossAutoScaler.main_loss_backward_scale = scale
        else:
            current.copy_(scale)

    replace("megatron.core.transformer.moe.moe_utils.MoEAuxLossAutoScaler.set_loss_scale", set_loss_scale)


# ---- FP8 (megatron_dsv3.fp8) ----
_DISPATCH_POSTPROCESS = "megatron.core.transformer.moe.token_dispatcher.MoEAlltoAllTokenDispatcher.dispatch_postprocess"


@megatron_change(
    targets=[_DISPATCH_POSTPROCESS],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="SequentialMLP receives the per-source token counts of each local expert",
)
def moe_experts_know_their_token_sources():
    """FP8 experts learn how many of their tokens came from each expert-parallel rank.

    An expert's input under expert parallelism concatenates the tokens of every source rank
    (Megatron's all-to-all dispatcher sorts them by local expert, then source).  The FP8 weight
    gradient tiles tokens 128 at a time, and a tile spanning two ranks' tokens would make the
    gradient depend on the parallel layout; the per-source counts let the FP8 experts restart
    tiles at each source (``megatron_dsv3.fp8.segments``).  After Megatron's own
    ``dispatch_postprocess`` the replacement records the dispatcher's counts, only when FP8
    experts were built (otherwise it costs one attribute check); the tokens are unchanged.
    """
    dispatch_postprocess = original(_DISPATCH_POSTPROCESS)

    def dispatch_postprocess_recording_sources(self, global_input_tokens, global_probs):
        result = dispatch_postprocess(self, global_input_tokens, global_probs)
        TOKEN_SOURCES.record(self)
        return result

    replace(_DISPATCH_POSTPROCESS, dispatch_postprocess_recording_sources)


@megatron_change(
    targets=["megatron.core.fp8_utils.get_fp8_recipe"],
    versions="megatron-core 0.19.x with Transformer Engine 2.3 - 2.20",
    fixed_upstream_when="Megatron passes per-tensor QParams (power-of-two or fp32 scales) to "
    "Float8BlockScaling from its arguments instead of TE's import-time environment variable",
)
def blockwise_fp8_recipe_follows_the_dsv3_recipe():
    """Megatron's block-wise FP8 recipe takes its scales from ``--dsv3-fp8``, not from import time.

    ``--fp8-recipe blockwise`` builds Transformer Engine's ``Float8BlockScaling``, whose scale rule
    (power of two unless ``NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1``) is fixed when TE's recipe module
    is imported, which Megatron does at ``import megatron.core``, before the arguments are read.
    For a config carrying a Transformer Engine FP8 plan the replacement returns the recipe object
    built from the plan (``megatron_dsv3.fp8.te.float8_block_scaling``: explicit QParams, block
    dimensions); every other config gets Megatron's recipe unchanged.
    """
    get_fp8_recipe = original("megatron.core.fp8_utils.get_fp8_recipe")

    def get_fp8_recipe_from_the_plan(config):
        plan = plan_of(config)
        recipe = getattr(config.fp8_recipe, "value", config.fp8_recipe)
        if plan is None or plan.backend != "transformer_engine" or recipe != "blockwise":
            return get_fp8_recipe(config)
        from transformer_engine.common import recipe as te_recipe

        return float8_block_scaling(plan.recipe, te_recipe)

    replace("megatron.core.fp8_utils.get_fp8_recipe", get_fp8_recipe_from_the_plan)


# ---- routing (DeepSeek-V3 section 2.1.2) ----
_GROUP_LIMITED_TOPK = "megatron.core.transformer.moe.moe_utils.group_limited_topk"


@megatron_change(
    targets=[_GROUP_LIMITED_TOPK],
    versions="megatron-core 0.19.x",
    fixed_upstream_when="group_limited_topk scores a group by the sum of its top-2 scores (DeepSeek's "
    "definition) rather than of its top topk // group_topk",
)
def group_limited_routing_scores_groups_by_their_top_two():
    """Node-limited routing scores each expert group by the sum of its two best affinities.

    DeepSeek-V3 (arXiv 2412.19437v2, section 2.1.2; ``Gate.forward`` of DeepSeek's inference code
    ``inference/model.py``, and transformers' ``DeepseekV3TopkRouter``) keeps, for each token, the
    ``group_topk`` groups whose top-2 values of ``s + b`` sum highest, then picks the top-k experts
    inside them.  Megatron-Core 0.19's ``group_limited_topk`` (``moe/moe_utils.py``) sums the top
    ``topk // group_topk`` values instead, which agrees with DeepSeek only when
    ``topk == 2 * group_topk`` (the released 8 experts from 4 groups), so a checkpoint with another
    ratio (top-4 from 1 group, say) would route to other experts than it was trained with.  The
    replacement differs only in that group score (a group of one expert scores by that one); the
    selection of groups and experts is Megatron's.  The fused Transformer Engine router
    (``--moe-router-fusion``) is not changed and is not used by megatron-dsv3.
    """

    def group_limited_topk(scores, topk, num_tokens, num_experts, num_groups, group_topk):
        import torch

        grouped = scores.view(num_tokens, num_groups, -1)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(num_tokens, num_groups, num_experts // num_groups)
        masked = scores.masked_fill(~score_mask.reshape(num_tokens, -1).bool(), float("-inf"))
        return torch.topk(masked, k=topk, dim=-1)

    replace(_GROUP_LIMITED_TOPK, group_limited_topk)
