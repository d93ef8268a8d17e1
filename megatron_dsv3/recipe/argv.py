"""Recipe -> the Megatron-LM argument list for stock ``pretrain_gpt.py``.

The model, parallel and backend arguments come from :mod:`megatron_dsv3.megatron_args` (the one
mapping from presets and layouts to flags); this module adds precision, training, data and
checkpoint arguments under Megatron's own names, then the recipe's raw ``megatron_args`` last so
they can override anything before them.  ``docs/recipes.md`` has the key-to-flag table.
"""

from __future__ import annotations

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.megatron_args import backend_args, cpu_args, model_args


def resolved_backend(recipe) -> str:
    """The backend the arguments name: ``local`` on CPU, else the recipe's.

    ``auto`` stays ``auto``: the plugin resolves it when the job starts, on the training machine
    (the arguments are often made on a login node without GPUs).  A named ``transformer_engine``
    is checked there too.
    """
    return "local" if recipe.is_cpu else recipe.backend


def planned_backend(recipe) -> str:
    """The backend estimates assume: ``auto`` on GPUs counts as ``local`` (no fused norms, no
    grouped GEMM), which never underestimates."""
    backend = resolved_backend(recipe)
    return "local" if backend == "auto" else backend


def recipe_argv(recipe, world_size: int | None = None) -> list[str]:
    """``--spec dsv3`` + model + parallel + backend (+ CPU) + precision + training + data +
    checkpoint arguments + the recipe's raw ``megatron_args``; validated first."""
    from megatron_dsv3.recipe.check import validate_recipe

    layout = validate_recipe(recipe, world_size)
    backend = resolved_backend(recipe)
    try:
        model = model_args(recipe.preset)
    except ConfigError as err:
        raise recipe.locate(err, section="model") from None
    argv = ["--spec", "dsv3"] + model + layout.args()
    argv += backend_args(backend)
    if recipe.is_cpu:
        argv += cpu_args()
    if recipe.precision == "bf16":
        argv += ["--bf16"]
    argv += training_args(recipe.training, recipe.preset.seq_length)
    argv += data_args(recipe)
    argv += checkpoint_args(recipe.checkpoint)
    return argv + [str(a) for a in recipe.extra_args]


def _opt(flag: str, value) -> list[str]:
    return [] if value is None else [flag, _text(value)]


def _text(value) -> str:
    if isinstance(value, float):
        return repr(value) if not value.is_integer() else str(int(value))
    return str(value)


def training_args(t, seq_length: int) -> list[str]:
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
    ]
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


def data_args(recipe) -> list[str]:
    d = recipe.data
    if d.source == "embedded":
        from megatron_dsv3.data import default_data_args

        return [str(a) for a in default_data_args(cache_dir=d.cache_dir)]
    if d.source == "mock":
        return ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(recipe.preset.vocab_size)]
    argv = ["--data-path", *[_text(x) for x in d.paths], "--tokenizer-type", d.tokenizer_type]
    argv += _opt("--tokenizer-model", d.tokenizer_model)
    return argv + ["--split", d.split]


def checkpoint_args(c) -> list[str]:
    argv = _opt("--save", c.save) + _opt("--save-interval", c.save_interval) + _opt("--load", c.load)
    return argv + ["--ckpt-format", c.format]
