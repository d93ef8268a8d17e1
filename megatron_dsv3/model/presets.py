"""Named model presets, kept as plain data.

Field names follow the DeepSeek papers and HuggingFace's ``DeepseekV3Config`` where they exist
(``first_k_dense``, ``num_routed_experts``, ``route_scale`` ...), so a preset reads like the
paper's model table.  :mod:`megatron_dsv3.args.compose` is the one place that turns a preset into
Megatron-LM command-line arguments.

Sources:
* ``deepseek-v3``: DeepSeek-V3 technical report (arXiv 2412.19437v2) section 4.2 and the official
  ``config_671B.json`` (``deepseek-ai/DeepSeek-V3``, ``inference/configs/config_671B.json``).
* ``deepseek-v2-lite``: DeepSeek-V2 report (arXiv 2405.04434) appendix B and the released
  ``DeepSeek-V2-Lite/config.json`` (15.7B total, 2.4B activated).
* ``dsv3-proxy`` and ``dsv3-tiny``: ours; every V3 feature, scaled down.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_dsv3.errors import ConfigError


@dataclass(frozen=True)
class ModelPreset:
    """A DeepSeek-style model: MLA attention, dense first layers, fine-grained MoE, MTP."""

    name: str
    description: str
    # Trunk.
    num_layers: int
    hidden_size: int
    vocab_size: int
    seq_length: int
    init_method_std: float
    norm_epsilon: float = 1e-6
    # Multi-head Latent Attention (section 2.1.1).
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # Rotary embedding on the decoupled key: plain RoPE or YaRN (section 4.3).
    rope_type: str = "rope"
    rope_theta: float = 10000.0
    yarn_factor: float = 40.0
    yarn_original_max_position: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 1.0
    # Feed-forward: the first `first_k_dense` layers are dense, the others MoE (section 4.2).
    first_k_dense: int = 3
    ffn_hidden_size: int = 18432
    num_routed_experts: int = 256
    num_shared_experts: int = 1
    moe_ffn_hidden_size: int = 2048
    moe_router_topk: int = 8
    # Routing (section 2.1.2): sigmoid affinities, top-k on s + b, gates from s normalised and
    # scaled by `route_scale`; node-limited routing over `num_groups` groups, `group_topk` per token.
    score_function: str = "sigmoid"
    normalize_topk: bool = True
    route_scale: float = 2.5
    num_groups: int = 8
    group_topk: int = 4
    expert_bias: bool = True
    expert_bias_update_rate: float = 1e-3
    seq_aux_loss_coeff: float = 1e-4
    # Multi-Token Prediction (section 2.2).
    mtp_num_layers: int = 1
    mtp_loss_scaling_factor: float = 0.3
    tie_embeddings: bool = False

    # ---- derived ----
    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def moe_layer_pattern(self) -> list[int]:
        """Megatron's ``--moe-layer-freq`` as a list: 0 = dense layer, 1 = MoE layer."""
        return [0] * self.first_k_dense + [1] * self.num_moe_layers

    def with_overrides(self, **overrides) -> "ModelPreset":
        """A copy with some fields changed; unknown fields raise :class:`ConfigError`."""
        known = {f.name for f in dataclasses.fields(self)}
        for key in overrides:
            if key not in known:
                raise ConfigError(
                    f"unknown model field '{key}'",
                    fix=f"use one of: {', '.join(sorted(known - {'name', 'description'}))}",
                    key=key,
                    choices=sorted(known),
                )
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DEEPSEEK_V3 = ModelPreset(
    name="deepseek-v3",
    description="DeepSeek-V3 671B (37B activated) as published: 61 layers, 256+1 experts, MTP D=1",
    num_layers=61,
    hidden_size=7168,
    vocab_size=129280,
    seq_length=4096,
    init_method_std=0.006,
    # The released config applies YaRN (s=40) for the 128K context extension (section 4.3);
    # the 4K pre-training recipe switches it off.
    rope_type="yarn",
)

DEEPSEEK_V2_LITE = ModelPreset(
    name="deepseek-v2-lite",
    description="DeepSeek-V2-Lite 15.7B (2.4B activated): MLA without query compression, "
    "64+2 experts, softmax routing",
    num_layers=27,
    hidden_size=2048,
    vocab_size=102400,
    seq_length=4096,
    init_method_std=0.006,
    num_attention_heads=16,
    q_lora_rank=None,
    kv_lora_rank=512,
    rope_type="yarn",
    yarn_mscale=0.707,
    yarn_mscale_all_dim=0.707,
    first_k_dense=1,
    ffn_hidden_size=10944,
    num_routed_experts=64,
    num_shared_experts=2,
    moe_ffn_hidden_size=1408,
    moe_router_topk=6,
    score_function="softmax",
    normalize_topk=False,
    route_scale=1.0,
    num_groups=1,
    group_topk=1,
    expert_bias=False,
    expert_bias_update_rate=0.0,
    seq_aux_loss_coeff=1e-3,
    mtp_num_layers=0,
    mtp_loss_scaling_factor=0.0,
)

DSV3_PROXY = ModelPreset(
    name="dsv3-proxy",
    description="Every DeepSeek-V3 feature at 2.4B parameters (0.57B activated): trains on one 80 GB GPU",
    num_layers=12,
    hidden_size=1536,
    vocab_size=129280,
    seq_length=4096,
    init_method_std=0.006,
    num_attention_heads=16,
    q_lora_rank=768,
    kv_lora_rank=512,
    first_k_dense=1,
    ffn_hidden_size=4096,
    num_routed_experts=64,
    num_shared_experts=1,
    moe_ffn_hidden_size=512,
    moe_router_topk=8,
    num_groups=8,
    group_topk=4,
)

DSV3_TINY = ModelPreset(
    name="dsv3-tiny",
    description="Every DeepSeek-V3 feature at a few million parameters, for CPU runs and tests",
    num_layers=4,
    hidden_size=128,
    vocab_size=4096,
    seq_length=128,
    init_method_std=0.02,
    num_attention_heads=4,
    q_lora_rank=64,
    kv_lora_rank=32,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    first_k_dense=1,
    ffn_hidden_size=384,
    num_routed_experts=16,
    num_shared_experts=1,
    moe_ffn_hidden_size=64,
    moe_router_topk=4,
    num_groups=4,
    group_topk=2,
)

PRESETS: dict[str, ModelPreset] = {
    p.name: p for p in (DEEPSEEK_V3, DEEPSEEK_V2_LITE, DSV3_PROXY, DSV3_TINY)
}


def get_preset(name: str) -> ModelPreset:
    """The preset called ``name``; an unknown name raises :class:`ConfigError` listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset '{name}'",
            fix=f"use one of: {', '.join(PRESETS)}",
            key="preset",
            value=name,
            choices=list(PRESETS),
        ) from None
