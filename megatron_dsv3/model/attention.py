"""Core attention for Multi-head Latent Attention on the local backend.

Megatron-Core's local ``DotProductAttention`` cannot serve MLA: ``MLASelfAttention`` builds its
core attention with ``k_channels``/``v_channels`` (query/key heads of qk_nope + qk_rope = 192 and
value heads of 128 in DeepSeek-V3), which it does not accept, and it sizes its output from
``kv_channels``.  This one takes the head sizes from the tensors and runs
``torch.nn.functional.scaled_dot_product_attention`` (flash or memory-efficient kernels on GPU,
a fused kernel on CPU) with MLA's softmax scale, which already carries YaRN's mscale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class MLACoreAttention(MegatronModule):
    """softmax(q k^T * scale) v over [seq, batch, heads, dim] tensors; output [seq, batch, heads*dv]."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError(
                "context parallelism needs Transformer Engine's attention: use the"
                " transformer_engine backend or context_parallel_size=1"
            )
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias=None,
        packed_seq_params=None,
        **unused,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError(
                "packed sequences need Transformer Engine's attention: use the transformer_engine"
                " backend"
            )
        mask_type = attn_mask_type or self.attn_mask_type
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if attention_mask is not None:
            # Megatron's masks mark the positions to drop; SDPA's boolean masks mark those to keep.
            mask, causal = ~attention_mask, False
        else:
            mask, causal = None, mask_type == AttnMaskType.causal
        dropout = self.dropout if self.training else 0.0
        if dropout and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout, scale=self.softmax_scale
                )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout, scale=self.softmax_scale
            )
        # [b, n, s, dv] -> [s, b, n * dv]
        b, n, s, dv = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, n * dv)
