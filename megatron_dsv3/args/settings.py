"""What the plugin's options imply for Megatron's own arguments: written once, applied where the job runs.

``megatron-dsv3 args`` prints only the plugin's options (``--dsv3-backend``, ``--dsv3-experts``,
``--dsv3-cpu``, ``--pipeline-schedule``); :func:`apply_plugin_options` turns them into Megatron's arguments right
after Megatron parses them and before it validates them, on the machine that runs the job, so that
``--dsv3-backend auto`` is decided where Transformer Engine either imports or does not.  An explicit
Megatron flag that contradicts what an option implies is an error naming both.

:func:`parse_megatron_args` is Megatron's ``parse_args`` + ``validate_args`` on a list (with the
plugin's options), and :func:`transformer_config` the ``TransformerConfig`` those arguments describe
with the placement attached: what ``pretrain_gpt.py`` would make of the same arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import sys

from megatron_dsv3.args.options import FP8_OVERRIDES, add_dsv3_arguments, option_flag
from megatron_dsv3.errors import ConfigError
from megatron_dsv3.fp8.plan import FP8Plan
from megatron_dsv3.fp8.provider import model_options
from megatron_dsv3.fp8.recipes import named_recipe
from megatron_dsv3.fp8.scaled_mm import scaled_mm_status
from megatron_dsv3.fp8.support import refusals, resolve_fp8_backend
from megatron_dsv3.fp8.te import environment
from megatron_dsv3.model import backends
from megatron_dsv3.model.backends import resolve_backend, resolve_experts
from megatron_dsv3.model.options import attach_options
from megatron_dsv3.parallel.layout import DEEPSEEK_SCHEDULES
from megatron_dsv3.parallel.megatron_layout import ScheduleOptions, megatron_layout
from megatron_dsv3.parallel.placement import Placement, place, placement_of
from megatron_dsv3.parallel.schedule_rules import FLAG_NAMES, check_schedule
from megatron_dsv3.pipeline.constraints import resolve_options

# Megatron argument (dest) -> value, per decision.
CPU_SETTINGS = {
    "distributed_backend": "gloo",
    "use_cpu_initialization": True,
    # Fused RoPE, masked-softmax and persistent layer-norm kernels are CUDA-only.
    "apply_rope_fusion": False,
    "masked_softmax_fusion": False,
    "no_persist_layer_norm": True,
}
BACKEND_SETTINGS = {
    # The local backend has no fused weight-gradient accumulation (that is apex's or TE's).
    "local": {"transformer_impl": "local", "gradient_accumulation_fusion": False},
    "transformer_engine": {"transformer_impl": "transformer_engine"},
}
# The flag a user would have written for each setting, for error messages.
_FLAGS = {
    "distributed_backend": "--distributed-backend",
    "use_cpu_initialization": "--use-cpu-initialization",
    "apply_rope_fusion": "--no-rope-fusion",
    "masked_softmax_fusion": "--no-masked-softmax-fusion",
    "no_persist_layer_norm": "--no-persist-layer-norm",
    "transformer_impl": "--transformer-impl",
    "gradient_accumulation_fusion": "--no-gradient-accumulation-fusion",
    "moe_grouped_gemm": "--moe-grouped-gemm",
    "num_virtual_stages_per_pipeline_rank": "--num-virtual-stages-per-pipeline-rank",
    # FP8 (--dsv3-fp8)
    "fp8": "--fp8-format",
    "fp8_recipe": "--fp8-recipe",
    "first_last_layers_bf16": "--first-last-layers-bf16",
    "num_layers_at_start_in_bf16": "--num-layers-at-start-in-bf16",
    "num_layers_at_end_in_bf16": "--num-layers-at-end-in-bf16",
    "moe_router_padding_for_quantization": "--moe-router-padding-for-quantization",
    "use_precision_aware_optimizer": "--use-precision-aware-optimizer",
    "exp_avg_dtype": "--exp-avg-dtype",
    "exp_avg_sq_dtype": "--exp-avg-sq-dtype",
    "main_params_dtype": "--main-params-dtype",
}
_APPLIED = "_dsv3_options_applied"


def schedule_settings(args: argparse.Namespace) -> dict:
    """DeepSeek's schedules hold two chunks per rank (Megatron's virtual stages) in their own order;
    Megatron validates two virtual stages, and the stage layout (model order) is kept for the
    placement (:func:`transformer_config`)."""
    schedule = getattr(args, "pipeline_schedule", None)
    if schedule not in DEEPSEEK_SCHEDULES:
        return {}
    return {"num_virtual_stages_per_pipeline_rank": 2, "pipeline_model_parallel_layout": None,
            "dsv3_pipeline_layout": args.pipeline_model_parallel_layout}


def implied_settings(args: argparse.Namespace, backend: str) -> dict:
    settings = dict(CPU_SETTINGS) if getattr(args, "dsv3_cpu", False) else {}
    settings.update(BACKEND_SETTINGS[backend])
    settings.update(experts_settings(args, backend))
    settings.update(schedule_settings(args))
    settings.update(fp8_settings(args, backend))
    return settings


def experts_settings(args: argparse.Namespace, backend: str) -> dict:
    """``--dsv3-experts`` as Megatron's ``--moe-grouped-gemm``, which the spec's provider reads
    (:mod:`megatron_dsv3.model.providers`); ``auto`` resolved on this machine."""
    experts = resolve_experts(getattr(args, "dsv3_experts", "auto"), backend,
                              on_cpu=bool(getattr(args, "dsv3_cpu", False)))
    return {"moe_grouped_gemm": experts == "grouped"}


# ---- FP8 (megatron_dsv3.fp8): what --dsv3-fp8 implies ----
# Refusal keys (recipe key paths) as the arguments that set them.
_FP8_KEY_FLAGS = {"parallel.tp": "--tensor-model-parallel-size", "fp8.backend": "--dsv3-fp8-backend",
                  "fp8.recipe": "--dsv3-fp8", "training.use_distributed_optimizer": "--use-distributed-optimizer",
                  "hardware.gpu": "this GPU"}


def fp8_plan(args: argparse.Namespace, backend: str):
    """The FP8 plan the arguments ask for, resolved and checked on this machine (None: no FP8)."""
    name = getattr(args, "dsv3_fp8", None)
    given = {dest: getattr(args, dest, None) for dest in FP8_OVERRIDES}
    if name is None:
        stray = [option_flag(d) for d, v in given.items() if v is not None]
        if stray:
            raise ConfigError(f"{', '.join(stray)} given without --dsv3-fp8", fix="add --dsv3-fp8 deepseek"
                              " (or te-blockwise), or remove them", key=stray[0])
        return None
    import torch

    on_cpu = bool(getattr(args, "dsv3_cpu", False))  # Megatron runs on GPUs unless in CPU mode
    recipe = named_recipe(name).with_overrides(**{FP8_OVERRIDES[d]: v for d, v in given.items()})
    fp8_backend = resolve_fp8_backend(getattr(args, "dsv3_fp8_backend", "auto"), model_backend=backend, on_cpu=on_cpu)
    capability = None if on_cpu or not torch.cuda.is_available() else torch.cuda.get_device_capability()
    te = backends.transformer_engine_status()
    found = refusals(recipe, fp8_backend, model_backend=backend, device="cpu" if on_cpu else "cuda",
                     capability=capability, tp=args.tensor_model_parallel_size,
                     pp=args.pipeline_model_parallel_size, use_distributed_optimizer=args.use_distributed_optimizer,
                     num_layers=args.num_layers, te_usable=te.usable, te_reason=te.reason)
    if fp8_backend == "pytorch" and not found:
        usable, reason = scaled_mm_status()
        if not usable:
            raise ConfigError(f"--dsv3-fp8-backend pytorch cannot run here: {reason}",
                              fix="use --dsv3-fp8-backend transformer_engine (with --dsv3-backend transformer_engine)"
                              " or emulated", key="--dsv3-fp8-backend")
    if found:
        first = found[0]
        flag = _FP8_KEY_FLAGS.get(first.key, option_flag("dsv3_" + first.key.replace(".", "_")))
        raise ConfigError(f"--dsv3-fp8 {name}: {first.problem}", fix=first.fix, key=flag)
    # On a GPU the quantizer runs as one compiled kernel (same codes); on CPU the eager reference
    # (CPU mode turns TorchDynamo off, and compiling costs more than it saves at CPU sizes).
    return FP8Plan(recipe=recipe, backend=fp8_backend, quantizer="eager" if on_cpu else "compiled")


def fp8_settings(args: argparse.Namespace, backend: str) -> dict:
    """Megatron's ``--fp8-*`` and optimizer settings for the plan, and the plan itself (``dsv3_fp8_plan``)."""
    plan = fp8_plan(args, backend)
    if plan is None:
        return {}
    recipe = plan.recipe
    settings = {"dsv3_fp8_plan": plan}
    if plan.backend == "transformer_engine":
        settings.update(fp8="e4m3", fp8_recipe="blockwise", moe_router_padding_for_quantization=True)
        if recipe.bf16_first_layers or recipe.bf16_last_layers:
            settings.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=recipe.bf16_first_layers,
                            num_layers_at_end_in_bf16=recipe.bf16_last_layers)
    else:
        settings["fp8"] = None  # the local backend's FP8 Linears; Megatron's TE FP8 stays off
    if recipe.moments == "bf16":
        settings.update(use_precision_aware_optimizer=True, exp_avg_dtype="bf16", exp_avg_sq_dtype="bf16",
                        main_params_dtype="fp32")
    return settings


def _export_fp8_environment(settings: dict) -> None:
    """Transformer Engine's recipe module reads its scale rule at import; say it for later imports
    (the recipe object itself is built explicitly, megatron_dsv3.fp8.te)."""
    plan = settings.get("dsv3_fp8_plan")
    if plan is not None and plan.backend == "transformer_engine":
        import os

        os.environ.update(environment(plan.recipe))


def _export_wandb_mode(args) -> None:
    """Megatron's W&B writer calls ``wandb.init`` without a mode; W&B reads it from ``WANDB_MODE``."""
    mode = getattr(args, "dsv3_wandb_mode", None)
    if mode is not None:
        import os

        os.environ["WANDB_MODE"] = mode


def apply_plugin_options(args: argparse.Namespace) -> argparse.Namespace:
    """Act on the plugin options right after parsing, before Megatron validates the arguments.

    ``--dsv3-cpu`` implies CPU mode, which its caller enables first (the run-time change that calls
    this after Megatron parses, ``plugin_options_join_megatron_parser``; the harness and the converter
    enable it themselves), since CPU mode is a set of run-time changes and this layer makes none."""
    if getattr(args, _APPLIED, False):
        return args
    requested = getattr(args, "dsv3_backend", "auto")
    if requested == "auto" and args.transformer_impl == "local":
        requested = "local"  # Megatron's own --transformer-impl local (its default is transformer_engine)
    backend = resolve_backend(requested)
    settings = implied_settings(args, backend)
    _check_conflicts(args, settings, requested)
    _check_schedule(args)
    _export_fp8_environment(settings)
    _export_wandb_mode(args)
    for dest, value in settings.items():
        setattr(args, dest, value)
    if getattr(args, "pipeline_schedule", None) in DEEPSEEK_SCHEDULES:
        schedule_options(args)  # with the backend now resolved
    setattr(args, _APPLIED, True)
    return args


def _check_conflicts(args, settings: dict, requested: str) -> None:
    defaults = _megatron_defaults()
    for dest, value in settings.items():
        if dest not in _FLAGS or dest not in defaults:
            continue
        current = getattr(args, dest, None)
        if current != value and current != defaults[dest]:
            raise ConfigError(
                f"{_FLAGS[dest]} was given as {current!r}, but the plugin's options need {value!r}"
                f" (--dsv3-backend {requested}, --dsv3-experts {getattr(args, 'dsv3_experts', 'auto')}"
                f"{', --dsv3-cpu' if args.dsv3_cpu else ''}"
                f"{', --pipeline-schedule ' + args.pipeline_schedule if args.pipeline_schedule else ''})",
                fix=f"remove {_FLAGS[dest]} and let the plugin set it, or change the plugin option",
                key=_FLAGS[dest],
            )


def _check_schedule(args) -> None:
    """The schedule's rules (:mod:`megatron_dsv3.parallel.schedule_rules`) on Megatron's flags, and
    the stage layout, before any model is built."""
    schedule = getattr(args, "pipeline_schedule", None)
    given = [o for o in ("zero_bubble", "fb_overlap") if getattr(args, f"dualpipe_{o}", None) is not None]
    if schedule is None:
        if given:
            check_schedule("1f1b", pp=args.pipeline_model_parallel_size, vpp=None, has_layout=False,
                           options_given=given, names=FLAG_NAMES)
        return  # Megatron's own choice, checked by Megatron
    virtual = args.num_virtual_stages_per_pipeline_rank or args.num_layers_per_virtual_pipeline_stage
    check_schedule(schedule, pp=args.pipeline_model_parallel_size, vpp=virtual,
                   has_layout=args.pipeline_model_parallel_layout is not None, options_given=given, names=FLAG_NAMES)
    if schedule == "dualpipe" and getattr(args, "log_params_norm", False):
        raise ConfigError("--log-params-norm with --pipeline-schedule dualpipe: Megatron's parameter norm"
                          " refuses the mirrored expert copies (marked shared, counted once)",
                          fix="drop --log-params-norm, or use dualpipev", key="--log-params-norm")
    if schedule in DEEPSEEK_SCHEDULES:
        place(args.num_layers, args.mtp_num_layers or 0, args.pipeline_model_parallel_size,
              layout=args.pipeline_model_parallel_layout, schedule=schedule)


@functools.cache
def _megatron_defaults() -> dict:
    from megatron.training.arguments import add_megatron_arguments

    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    add_megatron_arguments(parser)
    return {a.dest: a.default for a in parser._actions}


def schedule_options(args: argparse.Namespace) -> ScheduleOptions:
    """``--dualpipe-zero-bubble`` / ``--dualpipe-fb-overlap``, checked and defaulted by the one set of
    rules (:mod:`megatron_dsv3.pipeline.constraints`)."""
    return resolve_options(
        args.pipeline_schedule, ep=args.expert_model_parallel_size, backend=args.transformer_impl,
        zero_bubble=getattr(args, "dualpipe_zero_bubble", None), fb_overlap=getattr(args, "dualpipe_fb_overlap", None),
        recompute_granularity=args.recompute_granularity, recompute_modules=args.recompute_modules,
        mtp_num_layers=args.mtp_num_layers or 0,
    )


def attach_placement(config, args: argparse.Namespace):
    """Put a DeepSeek schedule's placement and options on a ``TransformerConfig`` (as Megatron's layout object)."""
    schedule = getattr(args, "pipeline_schedule", None)
    layout = config.pipeline_model_parallel_layout
    if schedule in DEEPSEEK_SCHEDULES and not isinstance(getattr(layout, "placement", None), Placement):
        placement = place(config.num_layers, config.mtp_num_layers or 0, config.pipeline_model_parallel_size,
                          layout=getattr(args, "dsv3_pipeline_layout", None), schedule=schedule)
        options = schedule_options(args)
        config.pipeline_model_parallel_layout = megatron_layout(placement, options)
        if options.zero_bubble and config.transformer_impl == "transformer_engine":
            # TE's modules then defer their weight GEMMs and the schedule's W runs them (backward_dw).
            # Set after the config's checks, which tie the field to Megatron's own overlapped
            # schedule (overlap_moe_expert_parallel_comm), the one other caller of backward_dw.
            config.delay_wgrad_compute = True
    return config


@functools.cache
def running_job_placement() -> Placement:
    """The placement of the model the running job trains (from the arguments Megatron parsed)."""
    from megatron.training import get_args

    return placement_of(transformer_config(get_args()))


def reports_loss() -> bool:
    """Whether this process prints the step's loss (:meth:`Placement.reports_loss` on its ranks)."""
    from megatron.core import parallel_state

    return running_job_placement().reports_loss(
        parallel_state.get_pipeline_model_parallel_rank(), tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        cp_rank=parallel_state.get_context_parallel_rank(), dp_rank=parallel_state.get_data_parallel_rank())


def transformer_config(args: argparse.Namespace):
    """The ``TransformerConfig`` (an ``MLATransformerConfig``) for parsed arguments, placement attached."""
    from megatron.training.arguments import core_transformer_config_from_args

    return attach_model_options(attach_placement(core_transformer_config_from_args(args), args), args)


def attach_model_options(config, args: argparse.Namespace):
    """Give a ``TransformerConfig`` the model options the arguments imply (``megatron_dsv3.model.options``):
    today those of the FP8 plan they resolved to (``--dsv3-fp8``), if any."""
    return attach_options(config, model_options(getattr(args, "dsv3_fp8_plan", None)))


def parse_megatron_args(argv: list[str], *, quiet: bool = True, world_size: int | None = None) -> argparse.Namespace:
    """Megatron's ``parse_args`` + ``validate_args`` on ``argv`` (not ``sys.argv``), plus our options;
    ``world_size``: as a job of that many processes sees them (default: ``$WORLD_SIZE``, else 1)."""
    import megatron.training.arguments as megatron_arguments

    saved = sys.argv
    sys.argv = ["megatron-dsv3"] + [str(a) for a in argv]
    try:
        args = megatron_arguments.parse_args(extra_args_provider=add_dsv3_arguments)
    finally:
        sys.argv = saved
    if world_size is not None:
        args.world_size, args.rank = world_size, 0
    apply_plugin_options(args)
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        # Looked up now: parsing `--dsv3-cpu` turns CPU mode on, whose changes include validate_args's.
        megatron_arguments.validate_args(args, {})
    return args
