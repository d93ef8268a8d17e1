"""Spec providers for the two backends (see :mod:`megatron_dsv3.backend` for the choice)."""

from __future__ import annotations

from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider

from megatron_dsv3.spec.attention import MLACoreAttention
from megatron_dsv3.spec.norm import RMSNorm


class DSV3LocalSpecProvider(LocalSpecProvider):
    """Megatron's local modules, with DeepSeek-V3's RMSNorm and an MLA-capable core attention."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
        return RMSNorm

    def core_attention(self):
        return MLACoreAttention


def spec_provider(backend: str) -> BackendSpecProvider:
    """The provider for a resolved backend name."""
    if backend == "local":
        return DSV3LocalSpecProvider()
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    return TESpecProvider()
