"""The ``dsv3`` layer spec: DeepSeek-V3 layers as Megatron-Core ``ModuleSpec`` trees.

A DeepSeek-V3 layer (arXiv 2412.19437v2, section 2.1) is

    h = x + MLA(RMSNorm(x));   out = h + FFN(RMSNorm(h))

with FFN a dense SwiGLU MLP in the first ``first_k_dense`` layers and a DeepSeekMoE layer (routed +
shared experts, sigmoid router with expert bias and group-limited top-k) in the others.  Everything
here is Megatron-Core's own module (``TransformerLayer``, ``MLASelfAttention``, ``MoELayer``,
``TopKRouter``, ``SharedExpertMLP``, ``MultiTokenPredictionBlock``); the spec only chooses them.
Which layers are dense comes from ``config.moe_layer_freq``; which of them this pipeline stage
holds comes from Megatron's own layout functions, so uneven and custom layouts work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_with_transformer_engine_submodules,
    get_mlp_module_spec_for_backend,
)
from megatron.core.transformer.enums import AttnMaskType, LayerType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.multi_latent_attention import (
    MLASelfAttention,
    MLASelfAttentionSubmodules,
)
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlockSubmodules,
    get_mtp_layer_spec_for_backend,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megatron_dsv3.runtime.registry import apply_group
from megatron_dsv3.spec.backends import spec_provider
from megatron_dsv3.spec.checks import check_config_for_spec


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


def layer_spec(config, *, moe: bool, backend: str) -> ModuleSpec:
    """One DeepSeek-V3 decoder layer: MLA attention and a dense or MoE feed-forward."""
    apply_group("model")
    provider = spec_provider(backend)
    num_experts = config.num_moe_experts if moe else None
    if backend == "transformer_engine":
        # Megatron's TE MLA layer is faithful (q/kv latent norms fused into the up-projections).
        submodules = get_gpt_layer_with_transformer_engine_submodules(
            num_experts=num_experts,
            moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=True,
            multi_latent_attention=True,
        )
        return ModuleSpec(module=TransformerLayer, submodules=submodules)

    from megatron.core.transformer import multi_latent_attention

    norm = provider.layer_norm(rms_norm=True)
    column, row = provider.column_parallel_linear(), provider.row_parallel_linear()
    # Replicated down-projections, as in Megatron's TE spec (see megatron_dsv3/spec/linear.py);
    # the `model` change `mla_accepts_replicated_down_projections` provides the class.
    down = multi_latent_attention.Linear
    attention = ModuleSpec(
        module=MLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=column,
            linear_q_down_proj=down,
            linear_q_up_proj=column,
            linear_kv_down_proj=down,
            linear_kv_up_proj=column,
            core_attention=provider.core_attention(),
            linear_proj=row,
            # RMSNorm on the compressed query (only when it is compressed) and key/value latents.
            q_layernorm=norm if config.q_lora_rank is not None else IdentityOp,
            kv_layernorm=norm,
        ),
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=get_mlp_module_spec_for_backend(
                backend=provider, num_experts=num_experts, moe_grouped_gemm=False
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def stage_layer_ids(config, vp_stage: int | None = None, pp_rank: int | None = None) -> list[int]:
    """0-based global ids of the decoder layers this pipeline stage (and virtual stage) builds."""
    layout = config.pipeline_model_parallel_layout
    if layout is not None:
        return list(layout.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank))
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return list(range(offset, offset + count))


def mtp_on_stage(config, vp_stage: int | None = None, pp_rank: int | None = None) -> bool:
    """Whether this stage holds the MTP modules: where the layout puts them, else the last stage.

    Megatron's own helper (``get_mtp_num_layers_to_build``) ignores ``pp_rank`` and asks the
    current process's parallel state; the spec takes the stage as given, so a stage can be built
    for any rank (tests, other placements).
    """
    if not config.mtp_num_layers:
        return False
    layout = config.pipeline_model_parallel_layout
    if pp_rank is None:
        from megatron.core import parallel_state

        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    if layout is not None:
        return layout.layout[pp_rank][vp_stage or 0].count(LayerType.mtp) > 0
    vp_size = config.virtual_pipeline_model_parallel_size
    last_vp = vp_size is None or vp_stage is None or vp_stage == vp_size - 1
    return pp_rank == config.pipeline_model_parallel_size - 1 and last_vp


def dsv3_block_spec(config, vp_stage: int | None = None, pp_rank: int | None = None) -> DSV3BlockSubmodules:
    """The block spec for the layers this stage holds, and the MTP spec if MTP lives here."""
    config = getattr(config, "transformer", config)  # a GPTModelConfig wraps the TransformerConfig
    backend = check_config_for_spec(config)
    dense = layer_spec(config, moe=False, backend=backend)
    moe = layer_spec(config, moe=True, backend=backend)
    pattern = moe_layer_pattern(config)
    layers = [moe if pattern[i] else dense for i in stage_layer_ids(config, vp_stage, pp_rank)]
    # The MTP module's transformer block is a layer like the last decoder layer (an MoE layer in
    # DeepSeek-V3: the released weights store it as layer 61).
    mtp = None
    if mtp_on_stage(config, vp_stage, pp_rank):
        mtp_layer = get_mtp_layer_spec_for_backend(
            mtp_model_layer_spec=moe if pattern[-1] else dense, backend=spec_provider(backend)
        )
        count = 1 if config.mtp_use_repeated_layer else config.mtp_num_layers
        mtp = MultiTokenPredictionBlockSubmodules(layer_specs=[mtp_layer] * count)
    return DSV3BlockSubmodules(
        layer_specs=layers,
        layer_norm=spec_provider(backend).layer_norm(rms_norm=True),
        mtp_block_spec=mtp,
    )
