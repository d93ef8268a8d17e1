"""Recipe validation: everything that must hold before Megatron starts.

:func:`validate_recipe` runs :func:`megatron_dsv3.model.validation.validate` (model, parallel sizes,
pipeline schedule and placement) and the recipe-level rules below, each raising a
:class:`ConfigError` placed at the recipe's ``file:line``.  ``megatron-dsv3 check`` reports it
(:mod:`megatron_dsv3.recipe.report`).
"""

from __future__ import annotations

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.fp8.support import gpu_capability, refusals, resolve_fp8_backend
from megatron_dsv3.model import backends
from megatron_dsv3.model.backends import planned_backend
from megatron_dsv3.model.validation import validate
from megatron_dsv3.parallel.layout import ParallelLayout
from megatron_dsv3.parallel.placement import place
from megatron_dsv3.parallel.schedule_rules import check_microbatches
from megatron_dsv3.recipe.schedule import schedule_options
from megatron_dsv3.recipe.sizes import fail as _fail
from megatron_dsv3.recipe.sizes import global_batch, parallel_layout


def validate_recipe(recipe, world_size: int | None = None) -> ParallelLayout:
    """Check everything that must hold before Megatron starts; the layout at ``world_size``."""
    preset = recipe.preset
    layout = parallel_layout(recipe, world_size)
    try:
        validate(preset, layout)
    except ConfigError as err:
        raise recipe.locate(err) from None
    placement = _check_pipeline(recipe, preset, layout)
    _check_batch(recipe, layout, placement)
    schedule_options(recipe, layout, placement.schedule)
    _check_lr_schedule(recipe)
    _check_device(recipe)
    _check_recompute(recipe)
    _check_data_and_checkpoint(recipe)
    _check_fp8(recipe, layout)
    return layout


def _check_pipeline(recipe, preset, layout: ParallelLayout):
    """Virtual stages against the layout string, and context parallelism; the placement."""
    par = recipe.parallel
    placement = place(preset.num_layers, preset.mtp_num_layers, layout.pp, vpp=layout.vpp, layout=layout.layout,
                      schedule=layout.schedule)
    if par.layout and par.vpp is not None and placement.vpp != par.vpp:
        raise _fail(recipe, "parallel.vpp",
                    f"parallel.vpp={par.vpp} but parallel.layout has {placement.vpp * par.pp} stages ="
                    f" pp {par.pp} x {placement.vpp}",
                    "set vpp to (stages in the layout) / pp, or null to take it from the layout")
    if par.cp > 1:
        backend = planned_backend(recipe.backend, recipe.is_cpu)
        if backend != "transformer_engine":
            raise _fail(recipe, "parallel.cp", f"parallel.cp={par.cp} needs Transformer Engine's attention"
                        f" (backend is {'local' if recipe.is_cpu else recipe.backend}; `auto` may become local)", "set backend: transformer_engine, or cp: 1")
    if preset.seq_length % (2 * par.cp) and par.cp > 1:
        raise _fail(recipe, "parallel.cp", f"parallel.cp={par.cp} needs model.seq_length={preset.seq_length}"
                    f" divisible by 2 x cp = {2 * par.cp}", "choose cp so that seq_length % (2 cp) == 0")
    return placement


def _check_batch(recipe, layout: ParallelLayout, placement) -> None:
    t = recipe.training
    unit = t.micro_batch_size * layout.dp
    gbs = global_batch(recipe, layout)
    if t.micro_batch_size < 1 or gbs < 1 or gbs % unit:
        raise _fail(recipe, "training.global_batch_size",
                    f"training.global_batch_size={gbs} is not divisible by micro_batch_size x dp ="
                    f" {t.micro_batch_size} x {layout.dp} = {unit}",
                    f"use a multiple of {unit} (dp = world_size / (tp x pp x cp) = {layout.dp})")
    sizes = [gbs] if t.rampup_batch_size is None else range(_check_ramp(recipe, unit), gbs + 1,
                                                             t.rampup_batch_size[1])
    for size in sizes:
        _check_microbatches(recipe, placement, size // unit, unit)


def _check_microbatches(recipe, placement, count: int, unit: int) -> None:
    """The schedule's rule for the micro-batches of a step (every batch size of a ramp)."""
    path = "training.rampup_batch_size" if recipe.training.rampup_batch_size else "training.global_batch_size"
    if placement.schedule == "interleaved" and count % placement.pp:
        # schedules.py: micro-batches go through each virtual stage pp at a time; a remainder group
        # smaller than pp raises at the first step.
        raise _fail(recipe, path,
                    f"the interleaved schedule (vpp={placement.vpp}) needs the micro-batches per step to be a"
                    f" multiple of pp={placement.pp}, but a batch of {count * unit} gives {count}",
                    f"use multiples of pp x micro_batch_size x dp = {placement.pp * unit}")
    if placement.schedule in ("dualpipe", "dualpipev"):
        try:
            check_microbatches(placement.schedule, placement.pp, count)
        except ConfigError as err:
            raise _fail(recipe, path, f"{err.problem} (a batch of {count * unit} sequences)",
                        f"{err.fix}; one micro-batch per data-parallel rank is micro_batch_size x dp = {unit}"
                        " sequences") from None


def _check_ramp(recipe, unit: int) -> int:
    """The ramp's own consistency; its first batch size (the schedule's rule is checked by the caller)."""
    t = recipe.training
    path = "training.rampup_batch_size"
    if len(t.rampup_batch_size) != 3 or min(t.rampup_batch_size) < 1:
        raise _fail(recipe, path, f"{path}={t.rampup_batch_size} must be three positive integers",
                    "write [start batch size, increment, ramp-up samples], e.g. [3072, 3072, 114501953]")
    start, incr, samples = t.rampup_batch_size
    if t.global_batch_size is None or (t.global_batch_size - start) % incr or start > t.global_batch_size:
        raise _fail(recipe, path, f"{path}={t.rampup_batch_size} does not step from {start} to"
                    f" training.global_batch_size={t.global_batch_size} in increments of {incr}",
                    "set global_batch_size = start + k x increment")
    if start % unit or incr % unit:
        raise _fail(recipe, path, f"{path}={t.rampup_batch_size}: every batch size of the ramp must be"
                    f" divisible by micro_batch_size x dp = {unit}", f"use multiples of {unit}")
    if samples < (t.global_batch_size - start) // incr:
        raise _fail(recipe, path, f"{path}: {samples} ramp-up samples are fewer than the ramp's steps",
                    "give the ramp-up length in sequences (samples)")
    return start


def _check_lr_schedule(recipe) -> None:
    t = recipe.training
    if (t.train_iters is None) == (t.train_samples is None):
        raise _fail(recipe, "training.train_iters",
                    "exactly one of training.train_iters and training.train_samples must be set"
                    f" (got train_iters={t.train_iters}, train_samples={t.train_samples})",
                    "set train_iters (steps) or train_samples (sequences), not both")
    by_iters = t.train_iters is not None
    wrong = ("lr_warmup_samples", "lr_decay_samples", "lr_wsd_decay_samples") if by_iters else (
        "lr_warmup_iters", "lr_decay_iters", "lr_wsd_decay_iters")
    for name in wrong:
        if getattr(t, name):
            other = name.replace("samples", "iters") if by_iters else name.replace("iters", "samples")
            raise _fail(recipe, f"training.{name}",
                        f"training.{name}={getattr(t, name)} with {'iteration' if by_iters else 'sample'}-based"
                        f" training (training.{'train_iters' if by_iters else 'train_samples'} is set)",
                        f"use training.{other} instead (Megatron rejects the mix)")
    unit = "iters" if by_iters else "samples"
    if t.lr_decay_style == "WSD" and not getattr(t, f"lr_wsd_decay_{unit}"):
        # OptimizerParamScheduler asserts it without a message.
        raise _fail(recipe, "training.lr_decay_style",
                    f"training.lr_decay_style=WSD needs training.lr_wsd_decay_{unit} (the length of the final decay)",
                    f"set lr_wsd_decay_{unit} and lr_wsd_decay_style, or use another lr_decay_style")
    warmup = getattr(t, f"lr_warmup_{unit}")
    decay = getattr(t, f"lr_decay_{unit}") or getattr(t, f"train_{unit}")
    if warmup and warmup >= decay:
        # OptimizerParamScheduler asserts warmup < decay steps, with no message.
        raise _fail(recipe, f"training.lr_warmup_{unit}",
                    f"training.lr_warmup_{unit}={warmup} is not below the decay length {decay}"
                    f" (training.lr_decay_{unit}, or train_{unit} when that is null)",
                    f"lower lr_warmup_{unit} or train longer")


def _check_device(recipe) -> None:
    if not recipe.is_cpu:
        return
    if recipe.backend == "transformer_engine":
        raise _fail(recipe, "backend", "backend=transformer_engine with hardware.device=cpu: Transformer"
                    " Engine needs a GPU", "set backend: local (or auto)")
    if recipe.training.use_distributed_optimizer:
        raise _fail(recipe, "training.use_distributed_optimizer",
                    "training.use_distributed_optimizer=true with hardware.device=cpu: Megatron's"
                    " distributed optimizer asserts CUDA tensors", "set use_distributed_optimizer: false")


def _check_recompute(recipe) -> None:
    rc, path = recipe.training.recompute, "training.recompute"
    if rc.granularity == "selective" and not rc.modules:
        raise _fail(recipe, f"{path}.modules", f"{path}.granularity=selective without modules",
                    "list the modules, e.g. modules: [mla_up_proj, layernorm]")
    if rc.granularity != "selective" and rc.modules:
        raise _fail(recipe, f"{path}.modules", f"{path}.modules={rc.modules} with granularity={rc.granularity}",
                    "set granularity: selective, or remove modules")
    full = rc.granularity == "full"
    if full and (rc.method is None or rc.num_layers is None or rc.num_layers < 1):
        raise _fail(recipe, path, f"{path}.granularity=full needs method and num_layers"
                    f" (got method={rc.method}, num_layers={rc.num_layers})",
                    "e.g. {granularity: full, method: uniform, num_layers: 1}")
    if not full and (rc.method is not None or rc.num_layers is not None):
        raise _fail(recipe, f"{path}.method", f"{path}.method/num_layers are for granularity=full",
                    "remove them, or set granularity: full")
    if planned_backend(recipe.backend, recipe.is_cpu) != "transformer_engine":  # `auto` may become local
        if "moe_act" in rc.modules:
            raise _fail(recipe, f"{path}.modules", f"{path}.modules has moe_act, which Megatron supports"
                        " only with grouped GEMM experts (the transformer_engine backend)",
                        "use backend: transformer_engine, or recompute `moe` instead")
        if "layernorm" in rc.modules:
            # CheckpointWithoutOutput refers to Transformer Engine's FP8GlobalStateManager.
            raise _fail(recipe, f"{path}.modules", f"{path}.modules has layernorm, which Megatron-Core 0.19"
                        " recomputes only with Transformer Engine (NameError: FP8GlobalStateManager otherwise)",
                        "use backend: transformer_engine, or drop layernorm (mla_up_proj works on both)")


# Megatron's two answers to "the schedule differs from the checkpoint's" (without either it asserts);
# args/compose.py passes the one checkpoint.use_checkpoint_opt_param_scheduler names.
SCHEDULER_FLAGS = {True: "--use-checkpoint-opt_param-scheduler", False: "--override-opt_param-scheduler"}


def refuse_scheduler_flags(extra: list, *, where: str | None) -> None:
    """Raw arguments that name either scheduler flag: the recipe key says it (Megatron asserts if
    both flags reach it)."""
    named = [str(a) for a in extra if str(a).replace("opt-param", "opt_param") in SCHEDULER_FLAGS.values()]
    if named:
        raise ConfigError(f"{named[0]} among the raw Megatron arguments: the recipe already passes one of"
                          f" {' / '.join(SCHEDULER_FLAGS.values())}",
                          fix="drop it and set checkpoint.use_checkpoint_opt_param_scheduler: true (keep the"
                          " checkpoint's schedule) or false (the recipe's, the default)",
                          key="checkpoint.use_checkpoint_opt_param_scheduler", where=where)


def _check_data_and_checkpoint(recipe) -> None:
    refuse_scheduler_flags(recipe.extra_args, where=recipe.where("megatron_args"))
    d = recipe.data
    if d.source == "files":
        if not d.paths:
            raise _fail(recipe, "data.paths", "data.source=files needs data.paths",
                        "list Megatron --data-path entries, e.g. paths: [/data/corpus_text_document]")
        if not d.tokenizer_type:
            raise _fail(recipe, "data.tokenizer_type", "data.source=files needs data.tokenizer_type",
                        "e.g. tokenizer_type: HuggingFaceTokenizer, with tokenizer_model: /path/to/tokenizer")
    elif d.paths or d.tokenizer_type or d.tokenizer_model:
        raise _fail(recipe, "data.paths", f"data.paths/tokenizer_* are only read with data.source=files"
                    f" (source is {d.source})", "remove them, or set source: files")
    c = recipe.checkpoint
    if c.save_interval is not None and not c.save:
        raise _fail(recipe, "checkpoint.save_interval", "checkpoint.save_interval without checkpoint.save",
                    "set checkpoint.save to a folder")
    if c.save and c.save_interval is None:
        # validate_args asserts it without a message.
        raise _fail(recipe, "checkpoint.save", "checkpoint.save without checkpoint.save_interval",
                    "set checkpoint.save_interval (steps between checkpoints), e.g. to train_iters")
    lg = recipe.logging
    if lg.wandb_project and not (lg.wandb_dir or c.save):
        # Megatron's W&B writer joins its default folder to --save (a TypeError without one).
        raise _fail(recipe, "logging.wandb_project", "logging.wandb_project needs a folder for the run files:"
                    " logging.wandb_dir, or checkpoint.save (then <save>/wandb)", "set logging.wandb_dir")
    _check_profiling(recipe)


def _check_profiling(recipe) -> None:
    p = recipe.profiling
    if p.torch_profiler and p.nsys:
        raise _fail(recipe, "profiling.nsys", "profiling.torch_profiler and profiling.nsys together (Megatron runs"
                    " one profiler per run)", "choose one: torch_profiler (a Chrome trace) or nsys (Nsight Systems)")
    if (p.torch_profiler or p.nsys) and p.step_end <= p.step_start:
        raise _fail(recipe, "profiling.step_end", f"profiling.step_end={p.step_end} is not after"
                    f" step_start={p.step_start}", "profile at least one step: step_end > step_start")
    if p.torch_profiler and not recipe.logging.tensorboard_dir:
        # Megatron's trace handler writes to <tensorboard_dir>/../torch_profile.
        raise _fail(recipe, "profiling.torch_profiler", "profiling.torch_profiler writes its trace next to"
                    " logging.tensorboard_dir, which is not set", "set logging.tensorboard_dir, e.g. to"
                    " <checkpoint.save>/tensorboard (the trace then goes to <checkpoint.save>/torch_profile)")
    if p.nvtx_ranges and not p.nsys:
        raise _fail(recipe, "profiling.nvtx_ranges", "profiling.nvtx_ranges marks Megatron's modules while Nsight"
                    " Systems profiles, and profiling.nsys is off", "set profiling.nsys: true, or drop nvtx_ranges")
    for name in ("nsys", "memory_snapshot"):
        if getattr(p, name) and recipe.is_cpu:
            raise _fail(recipe, f"profiling.{name}", f"profiling.{name} needs a GPU (hardware.device: cpu)",
                        "use profiling.torch_profiler on CPU, or run on a GPU")




# ---- FP8 (megatron_dsv3.fp8): a recipe the GPU, backend or layout cannot run is refused ----
def _check_fp8(recipe, layout: ParallelLayout) -> None:
    section = recipe.fp8
    try:
        fp8 = section.resolved()
    except ConfigError as err:
        raise recipe.locate(err) from None
    if fp8 is None:
        stray = [k for k in section.OVERRIDES if getattr(section, k) is not None]
        if stray or section.backend != "auto":
            key = f"fp8.{stray[0] if stray else 'backend'}"
            raise _fail(recipe, key, f"{key} is set but fp8.recipe is null (no FP8)",
                        "set fp8.recipe: deepseek (or te-blockwise), or remove the fp8 keys")
        return
    model_backend = planned_backend(recipe.backend, recipe.is_cpu)
    if recipe.backend == "auto" and section.backend in ("auto", "transformer_engine") and not recipe.is_cpu:
        model_backend = "transformer_engine"  # auto on a GPU: checked as the backend FP8 would run on
    backend = resolve_fp8_backend(section.backend, model_backend=model_backend, on_cpu=recipe.is_cpu)
    # Transformer Engine comes with its model backend; without it, only if it imports on this machine.
    te = None if model_backend == "transformer_engine" else backends.transformer_engine_status()
    found = refusals(fp8, backend, model_backend=model_backend, device=recipe.hardware.device,
                     capability=gpu_capability(recipe.hardware.gpu), tp=layout.tp, pp=layout.pp,
                     use_distributed_optimizer=recipe.training.use_distributed_optimizer,
                     num_layers=recipe.preset.num_layers, te_usable=te is None or te.usable,
                     te_reason="" if te is None else f"the model backend is {model_backend}, and here {te.reason}")
    if found:
        first = found[0]
        raise _fail(recipe, first.key, f"fp8.recipe={fp8.name} ({backend}): {first.problem}", first.fix)
