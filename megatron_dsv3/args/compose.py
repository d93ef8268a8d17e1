"""The one argument composer: a recipe becomes the Megatron-LM argument list.

``megatron-dsv3 args`` prints :func:`recipe_argv`, ``megatron-dsv3 train`` runs it, and the tests
and benchmarks build their models from it (:func:`megatron_argv` makes a recipe from a preset and a
parallel layout first), so what the tests check is what ``pretrain_gpt.py`` runs.  The model,
parallel, precision, training, data and checkpoint arguments use Megatron's own names; the backend,
CPU mode and the pipeline schedule are the plugin's options, whose implied Megatron settings are
written once in :mod:`megatron_dsv3.args.settings` and applied on the machine that runs the job
(``auto`` is resolved there).  The recipe's raw ``megatron_args`` come last, so they can override
anything before them.  ``docs/recipes.md`` has the key-to-flag table.
"""

from __future__ import annotations

import dataclasses

from megatron_dsv3 import data
from megatron_dsv3.args.options import FP8_OVERRIDES, option_flag
from megatron_dsv3.errors import ConfigError
from megatron_dsv3.model.backends import resolve_backend
from megatron_dsv3.model.presets import PRESETS, ModelPreset, get_preset
from megatron_dsv3.parallel.layout import ParallelLayout
from megatron_dsv3.recipe.check import SCHEDULER_FLAGS, validate_recipe
from megatron_dsv3.recipe.schema import ModelSection, ParallelSection, Recipe, TrainingSection


def recipe_argv(recipe: Recipe, world_size: int | None = None) -> list[str]:
    """``--spec dsv3`` + model + parallel + plugin options + precision + training + data +
    checkpoint arguments + the recipe's raw ``megatron_args``; the recipe is validated first."""
    layout = validate_recipe(recipe, world_size)
    argv = ["--spec", "dsv3"] + model_args(recipe.preset) + parallel_args(layout)
    argv += plugin_args(argv_backend(recipe), cpu=recipe.is_cpu, experts=recipe.model.experts)
    argv += fp8_args(recipe)
    if recipe.precision == "bf16":
        argv += ["--bf16"]
    argv += training_args(recipe.training, recipe.preset.seq_length)
    argv += data_args(recipe)
    argv += checkpoint_args(recipe.checkpoint)
    argv += logging_args(recipe) + profiling_args(recipe.profiling)
    return argv + [str(a) for a in recipe.extra_args]


def argv_backend(recipe: Recipe) -> str:
    """The backend the arguments name: ``local`` on CPU, else the recipe's (``auto`` stays ``auto``:
    it is resolved when the job starts, on the machine that runs it)."""
    return "local" if recipe.is_cpu else recipe.backend


def plugin_args(backend: str, *, cpu: bool, experts: str = "auto") -> list[str]:  # auto: resolved where it runs
    return ["--dsv3-backend", backend, "--dsv3-experts", experts] + (["--dsv3-cpu"] if cpu else [])


def fp8_args(recipe: Recipe) -> list[str]:
    """The ``fp8:`` section as the plugin's ``--dsv3-fp8*`` options (docs/fp8.md); none without FP8."""
    section = recipe.fp8
    if section.recipe is None:
        return []
    argv = ["--dsv3-fp8", section.recipe, "--dsv3-fp8-backend", section.backend]
    for dest, field_name in FP8_OVERRIDES.items():
        value = getattr(section, field_name)
        if value is not None:
            argv += [option_flag(dest), *([str(v) for v in value] if isinstance(value, list) else [_text(value)])]
    return argv


# ---- model ----
def model_args(preset: ModelPreset) -> list[str]:
    """Megatron-LM arguments that describe ``preset`` (architecture only: no parallelism or data)."""
    p = preset
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
    ]  # fmt: skip
    if p.q_lora_rank is not None:
        args += ["--q-lora-rank", p.q_lora_rank]
    if p.rope_type == "yarn":
        args += [
            "--rotary-scaling-factor", p.yarn_factor,
            "--mscale", p.yarn_mscale,
            "--mscale-all-dim", p.yarn_mscale_all_dim,
        ]  # fmt: skip
    else:
        # MLATransformerConfig raises "apply_rope_fusion for MLA only works with YARN RoPE".
        args += ["--no-rope-fusion"]
    if not p.tie_embeddings:
        args += ["--untie-embeddings-and-output-weights"]
    args += _moe_args(p)
    if p.mtp_num_layers:
        args += ["--mtp-num-layers", p.mtp_num_layers, "--mtp-loss-scaling-factor", p.mtp_loss_scaling_factor]
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
    ]  # fmt: skip
    if p.num_shared_experts:
        args += ["--moe-shared-expert-intermediate-size", p.num_shared_experts * p.moe_ffn_hidden_size]
    if p.score_function == "softmax" and not p.normalize_topk:
        # Softmax over all experts, then top-k without renormalising (DeepSeek-V2).
        args += ["--moe-router-pre-softmax"]
    if p.num_groups > 1:
        args += ["--moe-router-num-groups", p.num_groups, "--moe-router-group-topk", p.group_topk]
    if p.expert_bias:
        args += ["--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", p.expert_bias_update_rate]
    if p.seq_aux_loss_coeff > 0:
        args += ["--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", p.seq_aux_loss_coeff]
    else:
        args += ["--moe-router-load-balancing-type", "none"]
    return args


def preset_from_args(args, *, name: str = "checkpoint") -> ModelPreset:
    """The preset that parsed Megatron arguments describe: the inverse of :func:`model_args` (the
    checkpoint converter reads a run's architecture from the arguments its checkpoint records).
    Training-only fields Megatron does not record in the architecture (none today) keep the
    preset defaults; an architecture :func:`model_args` cannot produce is refused."""
    freq = list(args.moe_layer_freq) if isinstance(args.moe_layer_freq, (list, tuple)) else None
    if args.num_experts and (freq is None or freq != sorted(freq) or set(freq) - {0, 1}):
        raise ConfigError(f"moe_layer_freq={args.moe_layer_freq!r} is not dense layers followed by MoE layers",
                          fix="convert a DeepSeek-style model (first_k_dense dense layers, then MoE)",
                          key="moe_layer_freq")
    if not args.multi_latent_attention:
        raise ConfigError("the checkpoint's model has no Multi-head Latent Attention",
                          fix="convert a model trained with --spec dsv3", key="multi_latent_attention")
    yarn = args.rope_type == "yarn"
    aux = args.moe_router_load_balancing_type == "seq_aux_loss"
    first_k_dense = freq.count(0) if freq else args.num_layers
    return ModelPreset(
        name=name, description=f"read from Megatron arguments ({name})",
        num_layers=args.num_layers, hidden_size=args.hidden_size, vocab_size=args.vocab_size,
        seq_length=args.seq_length, init_method_std=args.init_method_std, norm_epsilon=args.layernorm_epsilon,
        num_attention_heads=args.num_attention_heads, q_lora_rank=args.q_lora_rank,
        kv_lora_rank=args.kv_lora_rank, qk_nope_head_dim=args.qk_head_dim,
        qk_rope_head_dim=args.qk_pos_emb_head_dim, v_head_dim=args.v_head_dim,
        rope_type=args.rope_type, rope_theta=float(args.rotary_base),
        yarn_factor=float(args.rotary_scaling_factor) if yarn else ModelPreset.yarn_factor,
        yarn_mscale=float(args.mscale) if yarn else ModelPreset.yarn_mscale,
        yarn_mscale_all_dim=float(args.mscale_all_dim) if yarn else ModelPreset.yarn_mscale_all_dim,
        first_k_dense=first_k_dense, ffn_hidden_size=args.ffn_hidden_size,
        num_routed_experts=args.num_experts or 0,
        num_shared_experts=(args.moe_shared_expert_intermediate_size or 0) // (args.moe_ffn_hidden_size or 1),
        moe_ffn_hidden_size=args.moe_ffn_hidden_size or ModelPreset.moe_ffn_hidden_size,
        moe_router_topk=args.moe_router_topk, score_function=args.moe_router_score_function,
        normalize_topk=not (args.moe_router_score_function == "softmax" and args.moe_router_pre_softmax),
        route_scale=float(args.moe_router_topk_scaling_factor or 1.0),
        num_groups=args.moe_router_num_groups or 1, group_topk=args.moe_router_group_topk or 1,
        expert_bias=bool(args.moe_router_enable_expert_bias),
        expert_bias_update_rate=float(args.moe_router_bias_update_rate) if args.moe_router_enable_expert_bias else 0.0,
        seq_aux_loss_coeff=float(args.moe_aux_loss_coeff) if aux else 0.0,
        mtp_num_layers=args.mtp_num_layers or 0,
        mtp_loss_scaling_factor=float(args.mtp_loss_scaling_factor) if args.mtp_num_layers else 0.0,
        tie_embeddings=not args.untie_embeddings_and_output_weights,
    )


# ---- parallelism ----
def parallel_args(layout: ParallelLayout) -> list[str]:
    args = [
        "--tensor-model-parallel-size", layout.tp,
        "--pipeline-model-parallel-size", layout.pp,
        "--expert-model-parallel-size", layout.ep,
        "--expert-tensor-parallel-size", layout.etp,
        "--context-parallel-size", layout.cp,
    ]  # fmt: skip
    if layout.vpp and not layout.layout:
        # With a layout string Megatron derives the virtual stages from it and rejects both.
        args += ["--num-virtual-stages-per-pipeline-rank", layout.vpp]
    if layout.sp:
        args += ["--sequence-parallel"]
    if layout.layout:
        args += ["--pipeline-model-parallel-layout", layout.layout]
    if layout.schedule:
        args += ["--pipeline-schedule", layout.schedule]
    for flag, value in (("--dualpipe-zero-bubble", layout.zero_bubble), ("--dualpipe-fb-overlap", layout.fb_overlap)):
        if value is not None:
            args += [flag if value else flag.replace("--", "--no-", 1)]
    return [str(a) for a in args]


# ---- training ----
def _opt(flag: str, value) -> list[str]:
    return [] if value is None else [flag, _text(value)]


def _text(value) -> str:
    if isinstance(value, float):
        return repr(value) if not value.is_integer() else str(int(value))
    return str(value)


def _number(value: float) -> str:
    """``10000.0`` as ``10000`` for Megatron's integer-typed flags."""
    return str(int(value)) if float(value).is_integer() else str(value)


def training_args(t: TrainingSection, seq_length: int) -> list[str]:
    """Batch, schedule, optimizer, recompute and logging arguments."""
    argv = ["--micro-batch-size", str(t.micro_batch_size)]
    if t.rampup_batch_size:
        argv += ["--step-batch-size-schedule", ramp_schedule(t, seq_length)]
    else:
        argv += _opt("--global-batch-size", t.global_batch_size)
    argv += _opt("--train-iters", t.train_iters) + _opt("--train-samples", t.train_samples)
    argv += ["--lr", _text(t.lr), "--min-lr", _text(t.min_lr), "--lr-decay-style", t.lr_decay_style]
    if t.lr_warmup_iters:
        argv += ["--lr-warmup-iters", str(t.lr_warmup_iters)]
    if t.lr_warmup_samples:
        argv += ["--lr-warmup-samples", str(t.lr_warmup_samples)]
    argv += _opt("--lr-decay-iters", t.lr_decay_iters) + _opt("--lr-decay-samples", t.lr_decay_samples)
    argv += _opt("--lr-wsd-decay-style", t.lr_wsd_decay_style)
    argv += _opt("--lr-wsd-decay-iters", t.lr_wsd_decay_iters)
    argv += _opt("--lr-wsd-decay-samples", t.lr_wsd_decay_samples)
    argv += [
        "--optimizer", "adam",  # Megatron's "adam" is AdamW (decoupled weight decay)
        "--weight-decay", _text(t.weight_decay),
        "--adam-beta1", _text(t.adam_beta1),
        "--adam-beta2", _text(t.adam_beta2),
        "--clip-grad", _text(t.clip_grad),
        "--seed", str(t.seed),
    ]  # fmt: skip
    if t.use_distributed_optimizer:
        argv += ["--use-distributed-optimizer"]
    argv += recompute_args(t.recompute)
    argv += ["--log-interval", str(t.log_interval), "--eval-interval", str(t.eval_interval),
             "--eval-iters", str(t.eval_iters)]
    return argv


def ramp_schedule(t, seq_length: int) -> str:
    """``rampup_batch_size: [start, incr, samples]`` as Megatron 0.19's ``--step-batch-size-schedule``.

    Megatron-Core 0.19 still parses ``--rampup-batch-size`` but ignores it
    (``init_num_microbatches_calculator``: "Deprecated. This argument is ignored."); the step
    schedule is its replacement.  The old ramp raised the batch by ``incr`` after every
    ``samples / ((global - start) / incr)`` samples; the schedule has the same steps, with
    thresholds in tokens (Megatron converts them with ``--seq-length``).
    """
    start, incr, samples = t.rampup_batch_size
    steps = (t.global_batch_size - start) // incr
    entries = []
    for i in range(steps + 1):
        # The first whole sample count at which the old ramp had taken i increments.
        threshold = (-(-samples * i // steps) if steps else 0) * seq_length
        entries.append(f"{threshold}:{start + i * incr}")
    # Megatron's parser accepts commas too; no spaces keeps `$(megatron-dsv3 args ...)` usable.
    return ",".join(entries)


def recompute_args(rc) -> list[str]:
    if rc.granularity == "selective":
        return ["--recompute-granularity", "selective", "--recompute-modules", *rc.modules]
    if rc.granularity == "full":
        return ["--recompute-granularity", "full", "--recompute-method", rc.method,
                "--recompute-num-layers", str(rc.num_layers)]
    return []


# ---- data and checkpoints ----
def data_args(recipe: Recipe) -> list[str]:
    d = recipe.data
    if d.source == "embedded":
        return [str(a) for a in data.default_data_args(cache_dir=d.cache_dir)]
    if d.source == "mock":
        return ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(recipe.preset.vocab_size)]
    argv = ["--data-path", *[_text(x) for x in d.paths], "--tokenizer-type", d.tokenizer_type]
    argv += _opt("--tokenizer-model", d.tokenizer_model)
    return argv + ["--split", d.split]


def checkpoint_args(c) -> list[str]:
    """Save, load, format, and whose LR schedule a resumed run follows (the recipe's: a longer run extends)."""
    argv = _opt("--save", c.save) + _opt("--save-interval", c.save_interval) + _opt("--load", c.load)
    return argv + ["--ckpt-format", c.format, SCHEDULER_FLAGS[c.use_checkpoint_opt_param_scheduler]]


# ---- logging ----
def logging_args(recipe: Recipe) -> list[str]:
    """The ``logging:`` section as Megatron's own TensorBoard, W&B and timer flags (the W&B mode,
    which Megatron has no flag for, is the plugin's ``--dsv3-wandb-mode``)."""
    lg = recipe.logging
    argv = ["--timing-log-level", str(lg.timing_log_level)] if lg.timing_log_level else []
    if lg.tensorboard_dir:
        argv += ["--tensorboard-dir", lg.tensorboard_dir, "--tensorboard-log-interval", str(lg.tensorboard_log_interval)]
    if lg.wandb_project:
        argv += ["--wandb-project", lg.wandb_project, "--wandb-exp-name", lg.wandb_run_name or recipe.name]
        argv += _opt("--wandb-entity", lg.wandb_entity) + _opt("--wandb-save-dir", lg.wandb_dir)
        argv += ["--dsv3-wandb-mode", lg.wandb_mode]
    return argv


def profiling_args(p) -> list[str]:
    """The ``profiling:`` section as Megatron's ``--profile*`` flags (its own profilers)."""
    argv = []
    if p.torch_profiler or p.nsys:
        argv += ["--profile", "--profile-step-start", str(p.step_start), "--profile-step-end", str(p.step_end)]
        argv += ["--use-pytorch-profiler"] * p.torch_profiler + ["--nvtx-ranges"] * p.nvtx_ranges
        argv += ["--profile-ranks", *map(str, p.ranks)] if p.ranks else []
        argv += ["--pytorch-profiler-collect-shapes" if p.torch_profiler else "--record-shapes"] * p.record_shapes
    return argv + (["--record-memory-history", "--memory-snapshot-path", p.memory_snapshot] if p.memory_snapshot else [])


# ---- a preset and a layout as a recipe (tests, benchmarks) ----
def preset_recipe(
    preset: ModelPreset | str,
    layout: ParallelLayout | None = None,
    *,
    backend: str = "auto",
    cpu: bool = True,
    micro_batch_size: int = 1,
    extra: list[str] | tuple[str, ...] = (),
    experts: str = "auto",  # model.experts
) -> Recipe:
    """An in-memory recipe for ``preset`` under ``layout``: fp32, mock data, one step, no checkpoints.

    Its global batch (``2 pp`` micro-batches) meets every schedule's rule; the tests feed their own.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    layout = layout or ParallelLayout()
    # A preset made elsewhere (from a checkpoint's config) is deepseek-v3 with its differences.
    base = get_preset(preset.name if preset.name in PRESETS else "deepseek-v3")
    overrides = {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)
                 if f.name not in ("name", "description") and getattr(preset, f.name) != getattr(base, f.name)}
    recipe = Recipe(
        name=f"{preset.name}-test",
        model=ModelSection(preset=base.name, overrides=overrides, experts=experts),
        backend=backend,
        precision="fp32",
        parallel=ParallelSection(world_size=layout.world_size, tp=layout.tp, pp=layout.pp, vpp=layout.vpp,
                                 ep=layout.ep, etp=layout.etp, cp=layout.cp, sp=layout.sp, layout=layout.layout,
                                 schedule=layout.schedule, zero_bubble=layout.zero_bubble,
                                 fb_overlap=layout.fb_overlap),
        training=TrainingSection(micro_batch_size=micro_batch_size, train_iters=1,
                                 global_batch_size=micro_batch_size * layout.dp * 2 * layout.pp),
        extra_args=[str(a) for a in extra],
    )
    recipe.hardware.device = "cpu" if cpu else "cuda"
    recipe.data.source = "mock"
    return recipe


def megatron_argv(
    preset: ModelPreset | str,
    layout: ParallelLayout | None = None,
    *,
    backend: str = "auto",
    cpu: bool | None = None,
    micro_batch_size: int = 1,
    extra: list[str] | tuple[str, ...] = (),
    experts: str = "auto",
) -> list[str]:
    """Validated Megatron-LM arguments that run ``preset`` under ``layout`` on this machine.

    ``cpu=None`` means "on CPU when no GPU is visible".  An explicit backend that cannot run here
    is an error now (the arguments are for this machine).
    """
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    if backend == "transformer_engine":
        resolve_backend(backend)  # raises the explanatory error where TE cannot run
    recipe = preset_recipe(preset, layout, backend=backend, cpu=cpu, micro_batch_size=micro_batch_size,
                           extra=extra, experts=experts)
    try:
        return recipe_argv(recipe)
    except ConfigError as err:  # the recipe is ours, not the user's file: report the preset's keys
        raise ConfigError(err.problem, fix=err.fix, key=err.key, value=None) from None
