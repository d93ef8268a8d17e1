"""The one mapping between a HuggingFace DeepSeek-V3 / V2 ``config.json`` and our :class:`ModelPreset`.

Field names are those of DeepSeek's released ``config.json`` (DeepSeek-V3's ``config_671B.json``,
DeepSeek-V2-Lite's) and of transformers 5's ``DeepseekV3Config`` / ``DeepseekV2Config``
(``transformers/models/deepseek_v3/configuration_deepseek_v3.py``), which also accepts the released
``rope_theta`` + ``rope_scaling`` in place of its own ``rope_parameters`` and calls the MTP depth
``num_mtp_layers`` (saved as ``num_nextn_predict_layers``).

Every field is one of: mapped to a preset field (:data:`_FIELDS` and the rope / routing / MTP
rules below), required to hold the one value our model computes with (:data:`_REQUIRED`), or
listed as harmless (:data:`IGNORED`: token ids, dtypes, bookkeeping).  Anything else changes the
function in a way we do not know, and is refused, as is a value we cannot represent.

Routing: ``deepseek_v3`` configs route with sigmoid scores, the ``noaux_tc`` expert bias, and
groups scored by their top-2 (as Megatron does with the ``model`` change
``group_limited_routing_scores_groups_by_their_top_two``).  ``deepseek_v2`` configs route with
softmax; their ``group_limited_greedy`` scores a group by its maximum, which Megatron cannot do, so
a V2 config with more than one group is refused (DeepSeek-V2-Lite has one).
"""

from __future__ import annotations

import dataclasses

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.model.presets import ModelPreset
from megatron_dsv3.model.validation import validate_model

# HF field -> preset field, copied as they are.
_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "ffn_hidden_size",
    "moe_intermediate_size": "moe_ffn_hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_attention_heads",
    "n_routed_experts": "num_routed_experts",
    "routed_scaling_factor": "route_scale",
    "kv_lora_rank": "kv_lora_rank",
    "q_lora_rank": "q_lora_rank",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "num_experts_per_tok": "moe_router_topk",
    "norm_topk_prob": "normalize_topk",
    "max_position_embeddings": "seq_length",
    "rms_norm_eps": "norm_epsilon",
    "tie_word_embeddings": "tie_embeddings",
    "initializer_range": "init_method_std",
}

# Fields our model computes with one value only: (value, why another cannot be represented).
_REQUIRED = {
    "hidden_act": ("silu", "the experts and dense layers are SwiGLU (silu-gated)"),
    "attention_bias": (False, "MLA's projections have no bias in DeepSeek-V3 or in Megatron's MLA"),
    "mlp_bias": (False, "the feed-forward projections have no bias"),
    "moe_layer_freq": (1, "after the first first_k_dense_replace layers every layer is MoE"),
    "rope_interleave": (True, "the checkpoint's rotary rows are interleaved pairs, which Megatron's MLA"
                              " de-interleaves (model/hf_names.py)"),
    "attention_dropout": (0.0, "attention dropout is off in DeepSeek-V3 and in our model"),
}

# Handled by the rules below (rope, routing, MTP, derived sizes, quantisation).
_RULED = {
    "model_type", "num_key_value_heads", "n_shared_experts", "n_group", "topk_group",
    "first_k_dense_replace", "scoring_func", "topk_method", "num_nextn_predict_layers", "num_mtp_layers",
    "rope_theta", "rope_scaling", "rope_parameters", "quantization_config", "head_dim", "qk_head_dim",
    "aux_loss_alpha", "seq_aux",
}

# Harmless: token ids, storage dtype, bookkeeping, inference-only switches.
IGNORED = frozenset({
    "architectures", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype",
    "transformers_version", "use_cache", "pretraining_tp", "ep_size", "output_router_logits",
    "router_aux_loss_coef", "_name_or_path", "id2label", "label2id", "return_dict", "output_hidden_states",
    "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "tokenizer_class",
    "tie_encoder_decoder", "use_return_dict", "_attn_implementation_autoset", "_commit_hash",
})

KNOWN = sorted(set(_FIELDS) | set(_REQUIRED) | _RULED | IGNORED)

_YARN_KEYS = {
    "factor": "yarn_factor",
    "original_max_position_embeddings": "yarn_original_max_position",
    "beta_fast": "yarn_beta_fast",
    "beta_slow": "yarn_beta_slow",
    "mscale": "yarn_mscale",
    "mscale_all_dim": "yarn_mscale_all_dim",
}

# Preset fields that only shape training: not in a config.json, not compared by check_against.
TRAINING_ONLY = ("name", "description", "init_method_std", "seq_length", "mtp_loss_scaling_factor",
                 "expert_bias_update_rate", "seq_aux_loss_coeff")

FP8_BLOCK = (128, 128)


def _refuse(where: str, field: str, value, reason: str, fix: str) -> ConfigError:
    return ConfigError(f"{field}={value!r} cannot be converted: {reason}", fix=fix, key=field, where=where)


def preset_from_hf_config(config: dict, *, name: str = "hf", where: str = "config.json") -> ModelPreset:
    """The preset whose model computes what ``config`` describes; a field we cannot honour raises
    :class:`ConfigError` naming it, its value and why."""
    if not isinstance(config, dict):
        raise ConfigError(f"the config is a {type(config).__name__}, not a JSON object", fix="give the"
                          " checkpoint's config.json", where=where)
    for key in config:
        if key not in KNOWN:
            raise ConfigError(f"unknown field {key!r}: it may change the model, and the converter does not"
                              " know how", fix="remove it if it is harmless, or convert with a transformers-"
                              "compatible DeepSeek-V3/V2 config", key=key, where=where, value=key, choices=KNOWN)
    model_type = config.get("model_type", "deepseek_v3")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        raise _refuse(where, "model_type", model_type, "only DeepSeek-V3 and DeepSeek-V2 checkpoints are supported",
                      "convert a deepseek_v3 (or deepseek_v2) checkpoint")
    for field, (value, reason) in _REQUIRED.items():
        if field in config and config[field] != value:
            raise _refuse(where, field, config[field], reason, f"use a checkpoint with {field}={value!r}")
    fields = {_FIELDS[k]: config[k] for k in _FIELDS if k in config}
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "n_routed_experts",
              "num_experts_per_tok", "moe_intermediate_size", "intermediate_size", "kv_lora_rank",
              "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
        if config.get(k) is None:
            raise _refuse(where, k, config.get(k), "the field is required (a DeepSeek MoE model with MLA)",
                          f"set {k} in the config")
    heads = config.get("num_key_value_heads")
    if heads is not None and heads != config["num_attention_heads"]:
        raise _refuse(where, "num_key_value_heads", heads, f"MLA has one key/value per head (num_attention_heads="
                      f"{config['num_attention_heads']}); grouped keys cannot be represented",
                      "use a checkpoint whose num_key_value_heads equals num_attention_heads")
    for derived, value in (("qk_head_dim", config["qk_nope_head_dim"] + config["qk_rope_head_dim"]),
                           ("head_dim", config["qk_rope_head_dim"])):
        if config.get(derived) not in (None, value):
            raise _refuse(where, derived, config[derived], f"it must equal {value} (derived from the head dims)",
                          f"remove {derived} or set it to {value}")
    fields["num_shared_experts"] = config.get("n_shared_experts") or 0
    fields["first_k_dense"] = config.get("first_k_dense_replace") or 0
    fields.update(_routing(config, model_type, where))
    fields.update(_rope(config, where))
    mtp = config.get("num_nextn_predict_layers", config.get("num_mtp_layers", 0)) or 0
    fields["mtp_num_layers"] = mtp
    fields["mtp_loss_scaling_factor"] = 0.3 if mtp else 0.0  # DeepSeek-V3 section 4.2 (first 10T tokens)
    if "aux_loss_alpha" in config:
        fields["seq_aux_loss_coeff"] = float(config["aux_loss_alpha"])
    fp8_block_size(config, where=where)
    fields.setdefault("init_method_std", 0.02)  # transformers' default initializer_range
    fields.setdefault("seq_length", 4096)
    fields.setdefault("tie_embeddings", False)
    if fields["tie_embeddings"]:
        # DeepSeek's models untie them; the name table and the MTP copies assume an lm_head.
        raise _refuse(where, "tie_word_embeddings", True, "DeepSeek-V3 and V2 keep a separate output head and the"
                      " converter maps one", "set tie_word_embeddings to false (and store lm_head.weight)")
    preset = ModelPreset(name=name, description=f"from a HuggingFace {model_type} config.json", **fields)
    try:
        validate_model(preset)
    except ConfigError as err:
        raise err.located(where) from None
    return preset


def _routing(config: dict, model_type: str, where: str) -> dict:
    method = config.get("topk_method", "noaux_tc" if model_type == "deepseek_v3" else "greedy")
    score = config.get("scoring_func", "sigmoid" if model_type == "deepseek_v3" else "softmax")
    groups, group_topk = config.get("n_group") or 1, config.get("topk_group") or 1
    if model_type == "deepseek_v3":
        if score != "sigmoid":
            raise _refuse(where, "scoring_func", score, "DeepSeek-V3 routes with sigmoid affinities",
                          "use scoring_func 'sigmoid', or model_type deepseek_v2 for softmax routing")
        if method != "noaux_tc":
            raise _refuse(where, "topk_method", method, "DeepSeek-V3 chooses experts with the auxiliary-loss-free"
                          " expert bias (noaux_tc)", "use topk_method 'noaux_tc'")
        return dict(score_function="sigmoid", expert_bias=True, expert_bias_update_rate=1e-3, num_groups=groups,
                    group_topk=group_topk if groups > 1 else 1)
    if score != "softmax":
        raise _refuse(where, "scoring_func", score, "DeepSeek-V2 routes with softmax", "use scoring_func 'softmax'")
    if method == "greedy" or (method == "group_limited_greedy" and groups == 1):
        groups = group_topk = 1  # greedy ignores groups (transformers' DeepseekV2Moe)
    elif method == "group_limited_greedy":
        raise _refuse(where, "topk_method", method, f"with n_group={groups} DeepSeek-V2 scores a group by its best"
                      " expert, Megatron by its top two", "this model cannot be converted: no Megatron router computes"
                      " it (DeepSeek-V2-Lite's config, with one group, converts)")
    else:
        raise _refuse(where, "topk_method", method, "DeepSeek-V2 knows 'greedy' and 'group_limited_greedy'",
                      "use topk_method 'greedy'")
    return dict(score_function="softmax", expert_bias=False, expert_bias_update_rate=0.0, num_groups=groups,
                group_topk=group_topk)


def _rope(config: dict, where: str) -> dict:
    """``rope_parameters`` (transformers 5) or the released ``rope_theta`` + ``rope_scaling``."""
    rope = dict(config.get("rope_parameters") or {})
    field = "rope_parameters"
    if not rope:
        rope = dict(config.get("rope_scaling") or {})
        field = "rope_scaling"
    theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    if kind == "default":
        if rope:
            raise _refuse(where, f"{field}.{sorted(rope)[0]}", rope[sorted(rope)[0]], "plain RoPE takes no parameters",
                          f"remove it from {field}")
        return dict(rope_type="rope", rope_theta=float(theta))
    if kind != "yarn":
        raise _refuse(where, f"{field}.rope_type", kind, "DeepSeek models use plain RoPE or YaRN",
                      "use rope_type 'yarn' or 'default'")
    out = dict(rope_type="yarn", rope_theta=float(theta))
    for key, preset_field in _YARN_KEYS.items():
        if key not in rope:
            raise _refuse(where, f"{field}.{key}", None, "YaRN needs it (its default differs between"
                          " implementations)", f"set {field}.{key} (DeepSeek-V3: see its config.json)")
        value = rope.pop(key)
        out[preset_field] = int(value) if key == "original_max_position_embeddings" else float(value)
    for key, value in rope.items():
        if value is not None:
            raise _refuse(where, f"{field}.{key}", value, "the converter does not know this YaRN parameter",
                          f"remove {field}.{key}")
    return out


def fp8_block_size(config: dict, *, where: str = "config.json") -> tuple[int, int] | None:
    """``(128, 128)`` for DeepSeek's FP8 release (E4M3 weights, one fp32 ``weight_scale_inv`` per
    128x128 block; DeepSeek-V3 section 3.3), None for an unquantised checkpoint; anything else raises."""
    q = config.get("quantization_config")
    if q is None:
        return None
    fix = "convert DeepSeek's FP8 release as published, or a BF16/FP32 checkpoint"
    if not isinstance(q, dict) or q.get("quant_method") != "fp8":
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise _refuse(where, "quantization_config.quant_method", method, "only block-wise FP8 can be dequantised", fix)
    if q.get("fmt", "e4m3") != "e4m3":
        raise _refuse(where, "quantization_config.fmt", q["fmt"], "only E4M3 weights are released", fix)
    block = q.get("weight_block_size")
    if block is None or list(block) != list(FP8_BLOCK):
        raise _refuse(where, "quantization_config.weight_block_size", block, "only 128x128 weight blocks are"
                      " read", fix)
    return FP8_BLOCK


def hf_config_from_preset(p: ModelPreset, *, dtype: str = "bfloat16") -> dict:
    """The ``config.json`` of ``p`` in the released layout (DeepSeek-V3's field names, YaRN as
    ``rope_scaling``, no ``quantization_config``).  Softmax presets become ``deepseek_v2`` configs
    (without MTP and with one group, the only ones DeepSeek-V2's routing and our model share);
    :func:`preset_from_hf_config` of the result gives ``p`` back, up to :data:`TRAINING_ONLY` fields."""
    v3 = p.score_function == "sigmoid"
    if v3 and not p.expert_bias:
        raise ConfigError(f"model {p.name}: sigmoid routing without an expert bias has no DeepSeek-V3 config",
                          fix="this model has no HuggingFace DeepSeek layout to export to (DeepSeek-V3's router"
                              " always has the expert bias); train with model.expert_bias: true to export",
                          key="expert_bias")
    if not v3 and (p.num_groups > 1 or p.mtp_num_layers):
        raise ConfigError(f"model {p.name}: softmax routing exports as DeepSeek-V2, which has neither groups"
                          f" scored by their top two (num_groups={p.num_groups}) nor MTP"
                          f" (mtp_num_layers={p.mtp_num_layers})",
                          fix="set model.num_groups: 1 and model.mtp_num_layers: 0 to export",
                          key="num_groups" if p.num_groups > 1 else "mtp_num_layers")
    out = {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        **{hf: getattr(p, field) for hf, field in _FIELDS.items()},
        "num_key_value_heads": p.num_attention_heads,
        "n_shared_experts": p.num_shared_experts,
        "first_k_dense_replace": p.first_k_dense,
        "n_group": p.num_groups,
        "topk_group": p.group_topk,
        "scoring_func": p.score_function,
        "topk_method": "noaux_tc" if v3 else "greedy",
        "aux_loss_alpha": p.seq_aux_loss_coeff,
        "seq_aux": True,
        "hidden_act": "silu",
        "attention_bias": False,
        "moe_layer_freq": 1,
        "rope_theta": p.rope_theta,
        "rope_scaling": None if p.rope_type == "rope" else {
            "type": "yarn", **{hf: getattr(p, field) for hf, field in _YARN_KEYS.items()}},
        "torch_dtype": dtype,
    }
    if v3:
        out["num_nextn_predict_layers"] = p.mtp_num_layers
        out["rope_interleave"] = True
    return out


def check_against(hf: ModelPreset, recipe: ModelPreset, *, where: str) -> None:
    """Raise :class:`ConfigError` naming every field in which the checkpoint's model ``hf`` and the
    recipe's ``recipe`` differ.  :data:`TRAINING_ONLY` fields are not compared, nor YaRN's when both
    use plain RoPE, nor the MTP depth when either has none (the converter decides about MTP)."""
    skip = set(TRAINING_ONLY)
    if hf.rope_type == recipe.rope_type == "rope":
        skip |= set(_YARN_KEYS.values())
    if not (hf.mtp_num_layers and recipe.mtp_num_layers):
        skip.add("mtp_num_layers")
    differ = [f.name for f in dataclasses.fields(ModelPreset)
              if f.name not in skip and getattr(hf, f.name) != getattr(recipe, f.name)]
    if differ:
        listing = ", ".join(f"{k}: checkpoint {getattr(hf, k)!r}, recipe {getattr(recipe, k)!r}" for k in differ)
        raise ConfigError(f"the checkpoint's model and the recipe's differ in {listing}",
                          fix="convert with a recipe whose model matches the checkpoint (or none: the checkpoint's"
                              " config then decides)", key=differ[0], where=where)
