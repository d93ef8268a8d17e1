"""What the ``dsv3`` spec requires of a Megatron ``TransformerConfig``, checked before building."""

from __future__ import annotations

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.model import backends


def check_config_for_spec(config) -> str:
    """Raise :class:`ConfigError` unless ``config`` describes a DeepSeek-style model; return the backend."""
    if not getattr(config, "multi_latent_attention", False):
        raise ConfigError(
            "the dsv3 spec builds Multi-head Latent Attention but the config has"
            " multi_latent_attention=False",
            fix="pass --multi-latent-attention with the MLA sizes, e.g. `megatron-dsv3 args <recipe>`"
            " for a complete argument list",
            key="multi_latent_attention",
        )
    if not config.num_moe_experts:
        raise ConfigError(
            "the dsv3 spec builds DeepSeekMoE layers but the config has no experts",
            fix="pass --num-experts (256 for DeepSeek-V3) and --moe-layer-freq",
            key="num_moe_experts",
        )
    if config.normalization != "RMSNorm":
        raise ConfigError(
            f"normalization={config.normalization!r}; DeepSeek-V3 uses RMSNorm",
            fix="pass --normalization RMSNorm",
            key="normalization",
        )
    if not config.qk_layernorm:
        raise ConfigError(
            "qk_layernorm=False drops the RMSNorm on MLA's compressed query and key/value latents",
            fix="pass --qk-layernorm",
            key="qk_layernorm",
        )
    backend = config.transformer_impl
    if backend not in ("local", "transformer_engine"):
        raise ConfigError(
            f"transformer_impl={backend!r} is not a dsv3 backend",
            fix="use --dsv3-backend auto|transformer_engine|local",
            key="transformer_impl",
        )
    if backend == "transformer_engine" and not backends.transformer_engine_status().usable:
        raise ConfigError(
            "transformer_impl='transformer_engine' (Megatron's default) but Transformer Engine cannot"
            f" be used here: {backends.transformer_engine_status().reason}",
            fix="pass --dsv3-backend local (or --transformer-impl local), or run where TE is installed",
            key="transformer_impl",
        )
    return backend
