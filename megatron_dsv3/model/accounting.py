"""Parameter, KV-cache and FLOP counts of a preset, from its architecture (no model is built).

Conventions (checked against a built Megatron model in the tests, and against the paper):

* ``total_params``: the main model (embedding, output head, all layers, norms), without MTP.
  DeepSeek-V3: 671.0B (the paper's 671B).
* ``mtp_params``: the MTP modules' own parameters (they share the embedding and output head).
  DeepSeek-V3: 11.6B; the released checkpoint stores 14B for MTP because it repeats the shared
  embedding and head (2 x 0.93B) inside layer 61.
* ``active_params``: parameters one token's forward pass uses: everything except the experts it is
  not routed to and the input-embedding rows it does not look up.  DeepSeek-V3: 36.6B (the paper's
  37B).
* ``kv_cache_bytes_per_token``: MLA caches the kv latent and the rope key per layer,
  ``layers x (kv_lora_rank + qk_rope_head_dim)`` values, in BF16.  DeepSeek-V3: 70,272 bytes.
* ``flops_per_token``: training FLOPs (forward + backward = 3 x forward) of the main model for one
  token at the preset's sequence length: 6 x the weights a token is multiplied with, plus causal
  attention (each token attends to (S+1)/2 positions on average).  DeepSeek-V3: 250 GFLOPs
  ("Insights into DeepSeek-V3", arXiv 2505.09343, table 2, gives 250 GFLOPs per token).
  ``mtp_flops_per_token`` is what the MTP modules add during training, and
  ``attention_flops_per_token`` the part of ``flops_per_token`` spent on attention scores and values
  (no weights: it has no weight-gradient part).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_dsv3.model.presets import ModelPreset


@dataclass(frozen=True)
class ModelCounts:
    total_params: int
    active_params: int
    mtp_params: int
    kv_cache_bytes_per_token: int
    flops_per_token: int
    mtp_flops_per_token: int
    embedding_params: int
    params_per_dense_layer: int
    params_per_moe_layer: int
    attention_flops_per_token: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def attention_params(p: ModelPreset) -> int:
    """MLA weights of one layer, including the RMSNorms on the compressed latents."""
    n, h = p.num_attention_heads, p.hidden_size
    if p.q_lora_rank is not None:
        q = h * p.q_lora_rank + p.q_lora_rank + p.q_lora_rank * n * p.qk_head_dim
    else:
        q = h * n * p.qk_head_dim
    kv = h * (p.kv_lora_rank + p.qk_rope_head_dim) + p.kv_lora_rank
    kv += p.kv_lora_rank * n * (p.qk_nope_head_dim + p.v_head_dim)
    out = n * p.v_head_dim * h
    return q + kv + out


def _norm_free_attention(p: ModelPreset) -> int:
    latent_norms = p.kv_lora_rank + (p.q_lora_rank or 0)
    return attention_params(p) - latent_norms


def dense_mlp_params(p: ModelPreset) -> int:
    return 3 * p.hidden_size * p.ffn_hidden_size  # SwiGLU: gate, up, down


def expert_params(p: ModelPreset) -> int:
    return 3 * p.hidden_size * p.moe_ffn_hidden_size


def moe_params(p: ModelPreset) -> int:
    router = p.hidden_size * p.num_routed_experts
    return router + (p.num_routed_experts + p.num_shared_experts) * expert_params(p)


def _active_moe_params(p: ModelPreset) -> int:
    router = p.hidden_size * p.num_routed_experts
    return router + (p.moe_router_topk + p.num_shared_experts) * expert_params(p)


def count(p: ModelPreset) -> ModelCounts:
    h, v = p.hidden_size, p.vocab_size
    layer_norms = 2 * h
    dense_layer = attention_params(p) + layer_norms + dense_mlp_params(p)
    moe_layer = attention_params(p) + layer_norms + moe_params(p)
    embedding = v * h
    head = 0 if p.tie_embeddings else v * h
    final_norm = h
    total = embedding + head + final_norm + p.first_k_dense * dense_layer + p.num_moe_layers * moe_layer

    # MTP module k: RMSNorm on h and on Emb(t), projection M (d x 2d), one transformer block (like
    # the last decoder layer), and a final RMSNorm before the shared output head.
    last_is_moe = p.num_moe_layers > 0
    mtp_block = moe_layer if last_is_moe else dense_layer
    mtp_per_depth = 2 * h + 2 * h * h + mtp_block + h
    mtp = p.mtp_num_layers * mtp_per_depth

    active_dense = attention_params(p) + layer_norms + dense_mlp_params(p)
    active_moe = attention_params(p) + layer_norms + _active_moe_params(p)
    active = (h + head + final_norm + p.first_k_dense * active_dense + p.num_moe_layers * active_moe)

    # FLOPs: 2 per weight per token forward; attention scores and values over (S+1)/2 positions.
    matmul_dense = _norm_free_attention(p) + dense_mlp_params(p)
    matmul_moe = _norm_free_attention(p) + _active_moe_params(p)
    head_matmul = v * h
    fwd_weights = p.first_k_dense * matmul_dense + p.num_moe_layers * matmul_moe + head_matmul
    context = (p.seq_length + 1) / 2
    attn_per_layer = 2 * p.num_attention_heads * (p.qk_head_dim + p.v_head_dim) * context
    attention_flops = 3 * p.num_layers * attn_per_layer
    flops = 3 * 2 * fwd_weights + attention_flops
    mtp_block_matmul = matmul_moe if last_is_moe else matmul_dense
    mtp_flops = 3 * p.mtp_num_layers * (
        2 * (2 * h * h + mtp_block_matmul + head_matmul) + attn_per_layer
    )

    kv_cache = p.num_layers * (p.kv_lora_rank + p.qk_rope_head_dim) * 2  # BF16
    return ModelCounts(
        total_params=int(total),
        active_params=int(active),
        mtp_params=int(mtp),
        kv_cache_bytes_per_token=int(kv_cache),
        flops_per_token=int(round(flops)),
        mtp_flops_per_token=int(round(mtp_flops)),
        embedding_params=int(embedding),
        params_per_dense_layer=int(dense_layer),
        params_per_moe_layer=int(moe_layer),
        attention_flops_per_token=int(round(attention_flops)),
    )
