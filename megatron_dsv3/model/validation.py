"""Checks that run before any model is built: each names the field, the values and the fix."""

from __future__ import annotations

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.model.presets import ModelPreset
from megatron_dsv3.parallel.layout import DEEPSEEK_SCHEDULES, ParallelLayout
from megatron_dsv3.parallel.placement import default_schedule, place
from megatron_dsv3.parallel.schedule_rules import check_schedule

# Megatron's MLATransformerConfig has no command-line flags for these YaRN fields; its defaults
# (transformer_config.py, MLATransformerConfig) are DeepSeek's values.
MEGATRON_FIXED_YARN = {
    "yarn_original_max_position": 4096,
    "yarn_beta_fast": 32.0,
    "yarn_beta_slow": 1.0,
}


def _require(ok: bool, problem: str, fix: str, key: str) -> None:
    if not ok:
        raise ConfigError(problem, fix=fix, key=key)


def validate_model(p: ModelPreset) -> None:
    """Architecture checks (no parallelism)."""
    for key in ("num_layers", "hidden_size", "vocab_size", "seq_length", "num_attention_heads",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                "ffn_hidden_size", "num_routed_experts", "moe_ffn_hidden_size", "moe_router_topk"):
        value = getattr(p, key)
        _require(isinstance(value, int) and value > 0, f"model.{key}={value!r} must be a positive integer",
                 f"set model.{key} to a positive integer", key)
    _require(
        0 <= p.first_k_dense < p.num_layers,
        f"model.first_k_dense={p.first_k_dense} dense layers but model.num_layers={p.num_layers}:"
        " at least one layer must be an MoE layer",
        f"set model.first_k_dense below {p.num_layers} (DeepSeek-V3 uses 3 of 61)",
        "first_k_dense",
    )
    _require(
        p.moe_router_topk <= p.num_routed_experts,
        f"model.moe_router_topk={p.moe_router_topk} exceeds model.num_routed_experts={p.num_routed_experts}",
        "choose moe_router_topk <= num_routed_experts", "moe_router_topk",
    )
    _require(p.num_groups >= 1, f"model.num_groups={p.num_groups} must be >= 1",
             "set model.num_groups to 1 (no group limit) or more", "num_groups")
    _require(
        p.num_routed_experts % p.num_groups == 0,
        f"model.num_groups={p.num_groups} does not divide model.num_routed_experts={p.num_routed_experts}",
        f"choose num_groups among the divisors of {p.num_routed_experts}"
        f" ({_divisors(p.num_routed_experts)})",
        "num_groups",
    )
    if p.num_groups > 1:
        _require(
            1 <= p.group_topk <= p.num_groups,
            f"model.group_topk={p.group_topk} must be between 1 and model.num_groups={p.num_groups}",
            "set group_topk to the number of groups (nodes) each token may use", "group_topk",
        )
        # Any top-k / group_topk ratio routes as DeepSeek does: a group scores by its top two
        # (runtime/model_changes.py, group_limited_routing_scores_groups_by_their_top_two).
        per_group = p.num_routed_experts // p.num_groups
        _require(
            p.moe_router_topk <= p.group_topk * per_group,
            f"model.moe_router_topk={p.moe_router_topk} experts cannot come from {p.group_topk} groups"
            f" of {per_group} experts",
            "raise group_topk or lower moe_router_topk", "moe_router_topk",
        )
    _require(p.score_function in ("sigmoid", "softmax"),
             f"model.score_function={p.score_function!r} is not supported",
             "use 'sigmoid' (DeepSeek-V3) or 'softmax' (DeepSeek-V2)", "score_function")
    _require(
        not (p.score_function == "sigmoid" and not p.normalize_topk and p.moe_router_topk > 1),
        "model.normalize_topk=false with sigmoid scores: Megatron-Core always normalises sigmoid"
        " gates over the chosen experts (DeepSeek-V3 does too)",
        "set model.normalize_topk: true", "normalize_topk",
    )
    _require(p.rope_type in ("rope", "yarn"), f"model.rope_type={p.rope_type!r} is not supported",
             "use 'rope' or 'yarn'", "rope_type")
    _require(p.mtp_num_layers >= 0, f"model.mtp_num_layers={p.mtp_num_layers} must be >= 0",
             "set 0 to turn Multi-Token Prediction off, 1 as in DeepSeek-V3", "mtp_num_layers")
    for field, value in MEGATRON_FIXED_YARN.items():
        _require(
            getattr(p, field) == value,
            f"model.{field}={getattr(p, field)} cannot be passed to Megatron-Core 0.19 (no flag exists"
            f" for it; MLATransformerConfig fixes it at {value})",
            f"keep {field}: {value}", field,
        )
    _require(
        p.q_lora_rank is None or (isinstance(p.q_lora_rank, int) and p.q_lora_rank > 0),
        f"model.q_lora_rank={p.q_lora_rank!r} must be a positive integer or null (no query compression)",
        "set q_lora_rank to e.g. 1536 (DeepSeek-V3) or null (DeepSeek-V2-Lite)", "q_lora_rank",
    )


def validate_layout(p: ModelPreset, layout: ParallelLayout) -> None:
    """Parallel-layout checks: divisibility and Megatron-Core's own requirements."""
    for key in ("tp", "pp", "ep", "etp", "cp", "dp"):
        value = getattr(layout, key)
        _require(isinstance(value, int) and value >= 1, f"parallel.{key}={value!r} must be an integer >= 1",
                 f"set parallel.{key} to 1 or more", key)
    _require(
        p.num_attention_heads % layout.tp == 0,
        f"parallel.tp={layout.tp} does not divide model.num_attention_heads={p.num_attention_heads}",
        f"choose tp among the divisors of {p.num_attention_heads} ({_divisors(p.num_attention_heads)})",
        "tp",
    )
    _require(
        p.num_routed_experts % layout.ep == 0,
        f"parallel.ep={layout.ep} does not divide model.num_routed_experts={p.num_routed_experts}",
        f"choose ep among the divisors of {p.num_routed_experts} ({_divisors(p.num_routed_experts)})",
        "ep",
    )
    dense_ranks = layout.tp * layout.cp * layout.dp
    _require(
        dense_ranks % (layout.ep * layout.etp) == 0,
        f"parallel.ep x parallel.etp = {layout.ep} x {layout.etp} does not divide the tp x cp x dp ="
        f" {layout.tp} x {layout.cp} x {layout.dp} = {dense_ranks} ranks of a pipeline stage",
        "raise dp (more GPUs) or lower ep so that ep x etp divides tp x cp x dp",
        "ep",
    )
    if layout.tp > 1:
        _require(
            layout.sp,
            f"parallel.tp={layout.tp} with MoE layers needs sequence parallelism (Megatron-Core"
            " requires it for MoE with tensor parallelism)",
            "set parallel.sp: true", "sp",
        )
    _validate_pipeline(p, layout)
    _require(
        p.seq_length % (layout.tp if layout.sp else 1) == 0,
        f"model.seq_length={p.seq_length} is not divisible by parallel.tp={layout.tp} (sequence parallel)",
        "choose a seq_length that is a multiple of tp", "seq_length",
    )


def _validate_pipeline(p: ModelPreset, layout: ParallelLayout) -> None:
    """The schedule against the pipeline sizes; the layers per stage as the placement needs them."""
    schedule = layout.schedule or default_schedule(layout.pp, layout.vpp, layout.layout)
    check_schedule(schedule, pp=layout.pp, vpp=layout.vpp, has_layout=layout.layout is not None,
                   options_given=[o for o in ("zero_bubble", "fb_overlap") if getattr(layout, o) is not None])
    if layout.layout is None and schedule not in DEEPSEEK_SCHEDULES:
        stages = layout.pp * (layout.vpp or 1)
        _require(
            p.num_layers % stages == 0,
            f"parallel.pp x vpp = {stages} pipeline stages do not divide model.num_layers={p.num_layers}",
            f"choose pp x vpp among the divisors of {p.num_layers} ({_divisors(p.num_layers)}), or give an"
            " explicit parallel.layout",
            "pp",
        )
    else:
        place(p.num_layers, p.mtp_num_layers, layout.pp, vpp=layout.vpp, layout=layout.layout, schedule=schedule)


def validate(p: ModelPreset, layout: ParallelLayout | None = None) -> None:
    validate_model(p)
    if layout is not None:
        validate_layout(p, layout)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
