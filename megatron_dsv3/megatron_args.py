"""The one mapping from presets and parallel layouts to Megatron-LM command-line arguments.

Everything that builds a model (``megatron-dsv3 args``, ``megatron-dsv3 train``, the tests and the
benchmarks) goes through these lists and Megatron's own argument parser, so what the tests check
is what ``pretrain_gpt.py`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.presets import ModelPreset

# Megatron's MLATransformerConfig has no command-line flags for these YaRN fields; its defaults
# (transformer_config.py, MLATransformerConfig) are DeepSeek's values.
MEGATRON_FIXED_YARN = {
    "yarn_original_max_position": 4096,
    "yarn_beta_fast": 32.0,
    "yarn_beta_slow": 1.0,
}


def model_args(preset: ModelPreset) -> list[str]:
    """Megatron-LM arguments that describe ``preset`` (architecture only: no parallelism or data)."""
    p = preset
    for field, value in MEGATRON_FIXED_YARN.items():
        if getattr(p, field) != value:
            raise ConfigError(
                f"{field}={getattr(p, field)} cannot be passed to Megatron-Core 0.19 (no flag exists"
                f" for it; MLATransformerConfig fixes it at {value})",
                fix=f"keep {field}: {value}",
                key=field,
            )
    args = [
        "--num-layers", p.num_layers,
        "--hidden-size", p.hidden_size,
        "--ffn-hidden-size", p.ffn_hidden_size,
        "--num-attention-heads", p.num_attention_heads,
        "--seq-length", p.seq_length,
        "--max-position-embeddings", p.seq_length,
        "--vocab-size", p.vocab_size,
        "--init-method-std", p.init_method_std,
        # DeepSeek-V3 trains without dropout (Megatron's defaults are 0.1).
        "--hidden-dropout", 0,
        "--attention-dropout", 0,
        "--normalization", "RMSNorm",
        "--norm-epsilon", p.norm_epsilon,
        "--swiglu",
        "--disable-bias-linear",
        "--position-embedding-type", "rope",
        "--rotary-base", _number(p.rope_theta),
        # Multi-head Latent Attention with RMSNorm on the compressed q and kv latents.
        "--multi-latent-attention",
        "--kv-lora-rank", p.kv_lora_rank,
        "--qk-head-dim", p.qk_nope_head_dim,
        "--qk-pos-emb-head-dim", p.qk_rope_head_dim,
        "--v-head-dim", p.v_head_dim,
        "--qk-layernorm",
        "--rope-type", p.rope_type,
    ]
    if p.q_lora_rank is not None:
        args += ["--q-lora-rank", p.q_lora_rank]
    if p.rope_type == "yarn":
        args += [
            "--rotary-scaling-factor", p.yarn_factor,
            "--mscale", p.yarn_mscale,
            "--mscale-all-dim", p.yarn_mscale_all_dim,
        ]
    if not p.tie_embeddings:
        args += ["--untie-embeddings-and-output-weights"]
    args += _moe_args(p)
    if p.mtp_num_layers:
        args += [
            "--mtp-num-layers", p.mtp_num_layers,
            "--mtp-loss-scaling-factor", p.mtp_loss_scaling_factor,
        ]
    return [str(a) for a in args]


def _moe_args(p: ModelPreset) -> list:
    pattern = f"([0]*{p.first_k_dense}+[1]*{p.num_moe_layers})"
    args = [
        "--num-experts", p.num_routed_experts,
        "--moe-layer-freq", pattern,
        "--moe-ffn-hidden-size", p.moe_ffn_hidden_size,
        "--moe-router-topk", p.moe_router_topk,
        "--moe-router-score-function", p.score_function,
        "--moe-router-topk-scaling-factor", p.route_scale,
        "--moe-router-dtype", "fp32",
        "--moe-token-dispatcher-type", "alltoall",
    ]
    if p.num_shared_experts:
        args += [
            "--moe-shared-expert-intermediate-size", p.num_shared_experts * p.moe_ffn_hidden_size,
        ]
    if p.score_function == "softmax" and not p.normalize_topk:
        # Softmax over all experts, then top-k without renormalising (DeepSeek-V2).
        args += ["--moe-router-pre-softmax"]
    if p.num_groups > 1:
        args += ["--moe-router-num-groups", p.num_groups, "--moe-router-group-topk", p.group_topk]
    if p.expert_bias:
        args += [
            "--moe-router-enable-expert-bias",
            "--moe-router-bias-update-rate", p.expert_bias_update_rate,
        ]
    if p.seq_aux_loss_coeff > 0:
        args += [
            "--moe-router-load-balancing-type", "seq_aux_loss",
            "--moe-aux-loss-coeff", p.seq_aux_loss_coeff,
        ]
    else:
        args += ["--moe-router-load-balancing-type", "none"]
    return args


@dataclass(frozen=True)
class ParallelLayout:
    """Megatron's parallel sizes; the world size is ``tp * pp * cp * dp``.

    Experts are split over ``ep`` ranks (each expert over ``etp``) inside the ``tp * cp * dp`` ranks
    of one pipeline stage, as Megatron-Core arranges its expert groups.
    """

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    etp: int = 1
    cp: int = 1
    dp: int = 1
    sp: bool = False
    # Megatron's --pipeline-model-parallel-layout, e.g. "Et*3|(tt|)*29,m|L" (uneven stages).
    layout: str | None = None

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def args(self) -> list[str]:
        args = [
            "--tensor-model-parallel-size", self.tp,
            "--pipeline-model-parallel-size", self.pp,
            "--expert-model-parallel-size", self.ep,
            "--expert-tensor-parallel-size", self.etp,
            "--context-parallel-size", self.cp,
        ]
        if self.vpp and not self.layout:
            # With a layout string Megatron derives the virtual stages from it and rejects both.
            args += ["--num-virtual-stages-per-pipeline-rank", self.vpp]
        if self.sp:
            args += ["--sequence-parallel"]
        if self.layout:
            args += ["--pipeline-model-parallel-layout", self.layout]
        return [str(a) for a in args]


def backend_args(backend: str) -> list[str]:
    """Arguments for a backend: ``transformer_engine``, ``local``, or ``auto``.

    ``auto`` is resolved when the job starts, on the machine that runs it (see
    :func:`megatron_dsv3.launch.arguments.apply_dsv3_arguments`), not where the arguments are made.
    """
    if backend == "transformer_engine":
        return ["--dsv3-backend", backend, "--transformer-impl", backend, "--moe-grouped-gemm"]
    if backend == "local":
        # The local backend has no fused weight-gradient accumulation (that is apex's or TE's).
        return ["--dsv3-backend", backend, "--transformer-impl", backend, "--no-gradient-accumulation-fusion"]
    return ["--dsv3-backend", "auto"]


def cpu_args() -> list[str]:
    """Arguments a CPU run needs on top of the local backend (see ``megatron_dsv3.cpu``)."""
    return [
        "--dsv3-cpu",
        "--distributed-backend", "gloo",
        "--use-cpu-initialization",
        # Fused RoPE, masked-softmax and persistent layer-norm kernels are CUDA-only.
        "--no-rope-fusion",
        "--no-masked-softmax-fusion",
        "--no-persist-layer-norm",
    ]


def _number(value: float) -> str:
    """``10000.0`` as ``10000`` for Megatron's integer-typed flags."""
    return str(int(value)) if float(value).is_integer() else str(value)
