"""The ``dsv3`` layer spec: DeepSeek-V3 layers as Megatron-Core ``ModuleSpec`` trees.

A DeepSeek-V3 layer (arXiv 2412.19437v2, section 2.1) is

    h = x + MLA(RMSNorm(x));   out = h + FFN(RMSNorm(h))

with FFN a dense SwiGLU MLP in the first ``first_k_dense`` layers and a DeepSeekMoE layer (routed +
shared experts, sigmoid router with expert bias and group-limited top-k) in the others.  Every module
is Megatron-Core's own (``TransformerLayer``, ``MLASelfAttention``, ``MoELayer``, ``TopKRouter``,
``SharedExpertMLP``, ``MultiTokenPredictionBlock``); the spec only chooses them, and every leaf comes
from a provider (:mod:`megatron_dsv3.model.providers`).  The tree mirrors Megatron's own
Transformer Engine MLA layer (``get_gpt_layer_with_transformer_engine_submodules``): with a provider
that fuses norms into linears (Transformer Engine) the q/kv latent norms live inside the
up-projections and the dense MLP's norm inside its first linear; otherwise they are separate
modules.  Which layers a chunk holds comes from the placement (:mod:`megatron_dsv3.parallel`).
Building a spec changes nothing: the fixes Megatron needs are run-time changes applied beforehand.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlockSubmodules,
    get_mtp_layer_spec_for_backend,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_dsv3.model.checks import check_config_for_spec
from megatron_dsv3.model.providers import provider_for
from megatron_dsv3.parallel.placement import placement_of


@dataclass
class DSV3BlockSubmodules(TransformerBlockSubmodules):
    """A block spec that also carries the Multi-Token Prediction spec built from the same layers.

    Megatron-Core 0.19's training builder rebuilds the MTP spec from its default layer specs and
    would ignore ours; the ``launch`` change ``mtp_is_built_from_the_dsv3_spec`` makes it use this.
    """

    mtp_block_spec: MultiTokenPredictionBlockSubmodules | None = None


def moe_layer_pattern(config) -> list[int]:
    """1 for an MoE layer, 0 for a dense layer, for every decoder layer (Megatron's moe_layer_freq)."""
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    return list(freq)


def attention_spec(config, provider) -> ModuleSpec:
    """Multi-head Latent Attention with RMSNorm on the compressed q and kv latents (section 2.1.1)."""
    fused = provider.fuse_layernorm_and_linear()
    norm = provider.layer_norm(rms_norm=True, for_qk=True)
    column = provider.column_parallel_linear()
    up = provider.column_parallel_layer_norm_linear() if fused else column
    latent_norm = IdentityOp if fused else norm
    return ModuleSpec(
        module=MLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=column,  # only without query compression (q_lora_rank None)
            linear_q_down_proj=provider.linear(),  # replicated over TP, as TE's spec
            linear_q_up_proj=up,
            linear_kv_down_proj=provider.linear(),
            linear_kv_up_proj=up,
            core_attention=provider.core_attention(),
            linear_proj=provider.row_parallel_linear(),
            q_layernorm=latent_norm if config.q_lora_rank is not None else IdentityOp,
            kv_layernorm=latent_norm,
        ),
    )


def layer_spec(config, *, moe: bool, provider) -> ModuleSpec:
    """One DeepSeek-V3 decoder layer: MLA attention and a dense or MoE feed-forward."""
    norm = provider.layer_norm(rms_norm=True, has_residual=True)
    # A fusing provider folds the dense MLP's norm into its first linear (as Megatron's TE spec).
    fused_mlp_norm = provider.fuse_layernorm_and_linear() and not moe
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=attention_spec(config, provider),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp if fused_mlp_norm else norm,
            mlp=get_mlp_module_spec_for_backend(
                backend=provider,
                num_experts=config.num_moe_experts if moe else None,
                moe_grouped_gemm=config.moe_grouped_gemm,
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def dsv3_block_spec(config, vp_stage: int | None = None, pp_rank: int | None = None,
                    provider=None) -> DSV3BlockSubmodules:
    """The block spec for the layers chunk ``(pp_rank, vp_stage)`` holds, and MTP's if it is there.

    ``pp_rank`` defaults to this process's pipeline rank; ``provider`` to the config's backend.
    """
    config = getattr(config, "transformer", config)  # a GPTModelConfig wraps the TransformerConfig
    check_config_for_spec(config)
    provider = provider or provider_for(config)
    if pp_rank is None:
        from megatron.core import parallel_state

        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    chunk = placement_of(config).chunk(pp_rank, vp_stage)
    dense = layer_spec(config, moe=False, provider=provider)
    moe = layer_spec(config, moe=True, provider=provider)
    pattern = moe_layer_pattern(config)
    layers = [moe if pattern[i] else dense for i in chunk.decoders]
    # The MTP module's transformer block is a layer like the last decoder layer (an MoE layer in
    # DeepSeek-V3: the released weights store it as layer 61).
    mtp = None
    if chunk.mtp:
        mtp_layer = get_mtp_layer_spec_for_backend(mtp_model_layer_spec=moe if pattern[-1] else dense, backend=provider)
        count = 1 if config.mtp_use_repeated_layer else config.mtp_num_layers
        mtp = MultiTokenPredictionBlockSubmodules(layer_specs=[mtp_layer] * count)
    return DSV3BlockSubmodules(
        layer_specs=layers,
        layer_norm=provider.layer_norm(rms_norm=True),
        mtp_block_spec=mtp,
    )
