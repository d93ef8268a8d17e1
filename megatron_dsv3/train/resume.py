"""What resuming a run will do, decided before any worker starts: the LR schedule and the layout.

Megatron settles both deep inside ``pretrain``, after the model and the checkpoint were loaded.
Its scheduler (``megatron/core/optimizer_param_scheduler.py``) asserts that the decay length,
warmup, rates and weight decay equal the checkpoint's unless ``--override-opt_param-scheduler``
(the arguments' schedule wins) or ``--use-checkpoint-opt_param-scheduler`` (the checkpoint's wins)
is given.  The recipe always passes one of them (``checkpoint.use_checkpoint_opt_param_scheduler``,
:func:`megatron_dsv3.args.compose.checkpoint_args`), so a longer ``train_iters`` extends a run.
Megatron's distributed checkpoint reshards the weights and the optimizer state to another TP, PP,
DP or pipeline schedule, but Megatron-Core 0.19's optimizer cannot load every change.

:func:`plan_resume` reads the checkpoint's common state (the arguments, consumed samples and
scheduler state the run saved), builds Megatron's own scheduler from the new arguments and loads
the saved state into it both ways, as the worker will, and returns a :class:`ResumePlan` whose
lines say what resuming does.  What Megatron would refuse only after loading is refused here, with
the reason and the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from megatron.core.dist_checkpointing.serialization import load_common_state_dict
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.training import global_vars, training

from megatron_dsv3.args.compose import preset_from_args
from megatron_dsv3.args.settings import parse_megatron_args
from megatron_dsv3.cpu import cpu_mode
from megatron_dsv3.errors import ConfigError
from megatron_dsv3.parallel.layout import SCHEDULE_NAMES
from megatron_dsv3.parallel.placement import default_schedule
from megatron_dsv3.train.checkpoints import TRACKER, step_folder

KEEP_KEY = "checkpoint.use_checkpoint_opt_param_scheduler"
# Model dimensions that decide the shapes (and the names) of the parameters a checkpoint holds.
SHAPE_FIELDS = (
    "num_layers", "hidden_size", "vocab_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "first_k_dense", "ffn_hidden_size",
    "num_routed_experts", "num_shared_experts", "moe_ffn_hidden_size", "expert_bias", "mtp_num_layers",
    "tie_embeddings",
)  # fmt: skip
# Scheduler settings besides the decay and warmup lengths, as the line names them.
_OTHER_SETTINGS = {"max_lr": "lr", "min_lr": "min_lr", "lr_decay_style": "decay style",
                   "start_wd": "start weight decay", "end_wd": "end weight decay",
                   "wd_incr_style": "weight-decay style"}


@dataclass(frozen=True)
class Schedule:
    """One LR schedule as Megatron's scheduler holds it once the checkpoint is loaded (in samples)."""

    state: dict  # OptimizerParamScheduler.state_dict()
    lr: float  # the rate of the first step after resuming

    @property
    def decay(self) -> int:
        return int(self.state["lr_decay_steps"])

    @property
    def warmup(self) -> int:
        return int(self.state["lr_warmup_steps"])

    def decays(self) -> bool:
        return self.state["lr_decay_style"] not in ("constant", "inverse-square-root")

    def settings(self) -> dict:
        """The state without the step count, and without the weight-decay length where the weight
        decay is constant (it follows train_iters but changes nothing then)."""
        ignored = {"num_steps"} | ({"wd_incr_steps"} if self.state["wd_incr_style"] == "constant" else set())
        return {k: v for k, v in self.state.items() if k not in ignored}


@dataclass
class ResumePlan:
    """What resuming a checkpoint does; :meth:`lines` says it (``check``), the launcher prints the
    schedule and layout lines before training."""

    load_dir: Path
    step: int  # the checkpoint's step; 0: a release checkpoint (weights only)
    consumed: int  # samples consumed by then
    train_iters: int
    saved_batch: int
    batch: int
    keep_checkpoint: bool
    recipe_schedule: Schedule | None  # None: no optimizer state is loaded (release, --finetune, ...)
    checkpoint_schedule: Schedule | None
    decay_iters_given: bool
    layout_changes: list[str]
    rng_restored: bool
    finetune: bool = False  # --finetune: the weights only, from step 1

    @property
    def schedule_changed(self) -> bool:
        return (self.recipe_schedule is not None
                and self.recipe_schedule.settings() != self.checkpoint_schedule.settings())

    def lines(self) -> list[str]:
        """What resuming does: the steps, then the schedule and layout lines where they change."""
        if self.step == 0 or self.finetune:
            what = "a release checkpoint" if self.step == 0 else f"step {self.step}, --finetune"
            first = f"starts from the weights in {self.load_dir} ({what}: no optimizer state, from step 1)"
        elif self.train_iters <= self.step:
            return [f"{self.load_dir} holds step {self.step}, and training.train_iters={self.train_iters}: nothing to"
                    f" train (a larger training.train_iters continues the run)"]
        else:
            first = (f"resumes {self.load_dir} at step {self.step + 1} ({self.consumed:,} samples consumed by step"
                     f" {self.step}) and trains to step {self.train_iters}")
            if self.recipe_schedule is None:
                first += " with a fresh optimizer and LR schedule (--no-load-optim)"
            elif not self.schedule_changed:
                first += "; the LR schedule is the checkpoint's"
        return [first] + [line for line in (self.schedule_line(), self.layout_line()) if line]

    def schedule_line(self) -> str | None:
        if not self.schedule_changed:
            return None
        new, old, s = self.recipe_schedule, self.checkpoint_schedule, self.step + 1
        recipe, saved = _lengths(new, self.batch), _lengths(old, self.saved_batch)
        if self.keep_checkpoint:
            used, other = old, new
            line = (f"LR schedule: the checkpoint's ({saved}) is kept over the recipe's ({recipe}) ({KEEP_KEY}:"
                    f" true); the LR of step {s} is {old.lr:.3g} (the recipe's schedule: {new.lr:.3g})")
        else:
            used, other = new, old
            line = (f"LR schedule: the recipe's ({recipe}) replaces the checkpoint's ({saved}); the LR of step {s}"
                    f" is {new.lr:.3g} (the checkpoint's schedule: {old.lr:.3g})")
        changed = [f"{label} {other.state[k]:g} -> {used.state[k]:g}" if isinstance(used.state[k], float)
                   else f"{label} {other.state[k]} -> {used.state[k]}"
                   for k, label in _OTHER_SETTINGS.items() if used.state[k] != other.state[k]]
        if changed:
            line += f"; {', '.join(changed)}"
        line += self._decay_end(used)
        if self.batch != self.saved_batch:
            line += (f"; the global batch changes {self.saved_batch} -> {self.batch} and Megatron counts the schedule"
                     f" in samples: the {self.consumed:,} samples of steps 1-{self.step} count as"
                     f" {_steps(self.consumed, self.batch)} steps of {self.batch}")
            end = _decay_end_step(used, self.step, self.consumed, self.batch)
            if used is new and end is not None and end != self.train_iters and not self.decay_iters_given:
                fit = self.train_iters - self.step + math.ceil(self.consumed / self.batch)
                line += f" (training.lr_decay_iters={fit} ends the decay at step {self.train_iters})"
        if not self.keep_checkpoint:
            line += f"; {KEEP_KEY}=true keeps the checkpoint's"
        return line

    def _decay_end(self, schedule: Schedule) -> str:
        if not schedule.decays():
            return ""
        end = _decay_end_step(schedule, self.step, self.consumed, self.batch)
        min_lr = f"min_lr {schedule.state['min_lr']:.3g}"
        if end is None:
            return f"; its decay is over: steps {self.step + 1}-{self.train_iters} train at {min_lr}"
        if end < self.train_iters:
            return f"; its decay to {min_lr} ends with step {end}, steps {end + 1}-{self.train_iters} train at it"
        if end > self.train_iters:
            return f"; its decay to {min_lr} would end with step {end}, after the last step ({self.train_iters})"
        return f"; its decay to {min_lr} ends with step {end}"

    def layout_line(self) -> str | None:
        if not self.layout_changes:
            return None
        state = "weights and optimizer state" if self.recipe_schedule is not None else "weights"
        line = f"layout {', '.join(self.layout_changes)}: Megatron's distributed checkpoint reshards the {state}"
        restarts_rng = not self.rng_restored and self.recipe_schedule is not None
        return line + (" (the RNG state is not restored: TP or PP changed)" if restarts_rng else "")


def _steps(samples: int, batch: int) -> str:
    return f"{samples // batch}" if samples % batch == 0 else f"{samples / batch:.1f}"


def _lengths(schedule: Schedule, batch: int) -> str:
    return (f"decay {schedule.decay:,} samples = {_steps(schedule.decay, batch)} steps of {batch}, warmup"
            f" {schedule.warmup:,} = {_steps(schedule.warmup, batch)}")


def _decay_end_step(schedule: Schedule, step: int, consumed: int, batch: int) -> int | None:
    """The last step whose rate is still decaying (None: the decay ended before ``step + 1``).

    The update of step ``step + k`` uses the rate at ``consumed + (k - 1) x batch`` samples
    (Megatron steps the scheduler after each update), and the rate is min_lr from ``decay`` samples on.
    """
    if schedule.decay <= consumed:
        return None
    return step + math.ceil((schedule.decay - consumed) / batch)


# ---- reading the checkpoint and the new arguments ----
def read_common_state(load_dir: Path, step: int) -> dict | None:
    """The checkpoint's common state (arguments, step, scheduler, ...), or None for a format other
    than Megatron's ``torch_dist`` (whose common state is read with Megatron's own reader)."""
    release = (load_dir / TRACKER).read_text().strip() == "release"
    folder = load_dir / "release" if release else step_folder(load_dir, step)
    if not (folder / "metadata.json").exists() or '"torch_dist"' not in (folder / "metadata.json").read_text():
        return None
    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled ... load in a single process": intended
            warnings.simplefilter("ignore")
            state = load_common_state_dict(str(folder))
    except Exception as err:  # noqa: BLE001  (the reason is reported)
        raise ConfigError(f"cannot resume from {load_dir}: the common state of {folder} cannot be read"
                          f" ({type(err).__name__}: {str(err)[:300]})",
                          fix="resume from a complete checkpoint saved by Megatron-Core 0.19, or train in another"
                          " folder (checkpoint.save=... checkpoint.load=...)", key="checkpoint.load") from None
    return state if isinstance(state, dict) else None


def requested_args(argv: list[str], world_size: int) -> argparse.Namespace:
    """Megatron's arguments for ``argv`` as the workers will parse them (CPU mode only while parsing)."""
    try:
        with cpu_mode() if "--dsv3-cpu" in argv else contextlib.nullcontext():
            return parse_megatron_args(argv, world_size=world_size)
    except (AssertionError, ValueError) as err:  # Megatron's validate_args: the workers would stop there too
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"Megatron's argument check refuses these arguments: {err}",
                          fix="see `megatron-dsv3 args RECIPE` for the arguments and change the recipe key that"
                          " sets the one named", key=None) from None


def loaded_scheduler(args: argparse.Namespace, saved_state: dict, *, keep_checkpoint: bool):
    """Megatron's scheduler as the worker builds it (``get_optimizer_param_scheduler``) and then
    loads the checkpoint's state into it; and the arguments it read (it fills ``lr_decay_iters``)."""
    args = copy.copy(args)
    args.use_checkpoint_opt_param_scheduler, args.override_opt_param_scheduler = keep_checkpoint, not keep_checkpoint
    previous = global_vars._GLOBAL_ARGS  # noqa: SLF001  (restored below; the launcher sets none)
    global_vars.set_args(args)
    log = logging.getLogger("megatron.core.optimizer_param_scheduler")
    level, log.level = log.level, logging.WARNING  # its per-value lines are the worker's to log
    try:
        scheduler = training.get_optimizer_param_scheduler(SimpleNamespace(param_groups=[{}]))
        scheduler.load_state_dict(dict(saved_state))
    finally:
        global_vars.set_args(previous)
        log.setLevel(level)
    return scheduler, args


# ---- the plan ----
def plan_resume(recipe, argv: list[str], world_size: int, step: int) -> ResumePlan | None:
    """What resuming ``recipe.checkpoint.load`` (at ``step``) with ``argv`` on ``world_size``
    processes does; None when the checkpoint's format cannot be read ahead.  Raises
    :class:`ConfigError` for what Megatron-Core 0.19 cannot resume."""
    load_dir = Path(recipe.checkpoint.load)
    state = read_common_state(load_dir, step)
    saved_args = state.get("args") if state else None
    if saved_args is None:
        return None
    new = requested_args(argv, world_size)
    check_model(recipe, saved_args, load_dir)
    loads_optimizer = (step > 0 and not new.finetune and not new.no_load_optim
                       and not getattr(saved_args, "no_save_optim", False) and "opt_param_scheduler" in state)
    old_layout, new_layout = layout_of(saved_args), layout_of(new)
    if loads_optimizer:
        check_optimizer_layout(saved_args, new, state.get("content_metadata") or {}, load_dir)
    keep = bool(new.use_checkpoint_opt_param_scheduler)
    recipe_schedule = checkpoint_schedule = None
    train_iters = new.train_iters
    if loads_optimizer:
        recipe_schedule, checkpoint_schedule, train_iters = _schedules(new, state["opt_param_scheduler"])
    return ResumePlan(
        load_dir=load_dir, step=step, consumed=int(getattr(saved_args, "consumed_train_samples", 0) or 0),
        train_iters=train_iters or 0, saved_batch=saved_args.global_batch_size, batch=new.global_batch_size,
        keep_checkpoint=keep, recipe_schedule=recipe_schedule, checkpoint_schedule=checkpoint_schedule,
        decay_iters_given=new.lr_decay_iters is not None or new.lr_decay_samples is not None,
        layout_changes=[f"{name} {old_layout[name]} -> {new_layout[name]}" for name in new_layout
                        if old_layout[name] != new_layout[name]],
        rng_restored=(old_layout["TP"], old_layout["PP"]) == (new_layout["TP"], new_layout["PP"]),
        finetune=bool(new.finetune),
    )


def _schedules(new: argparse.Namespace, saved_state: dict) -> tuple[Schedule, Schedule, int]:
    """(the recipe's schedule, the checkpoint's, train_iters), each as the worker would load it."""
    schedules = []
    for keep in (False, True):
        scheduler, args = loaded_scheduler(new, saved_state, keep_checkpoint=keep)
        schedules.append(Schedule(state=scheduler.state_dict(), lr=scheduler.get_lr({})))
    return schedules[0], schedules[1], args.train_iters


def check_model(recipe, saved_args: argparse.Namespace, load_dir: Path) -> None:
    """The checkpoint holds the recipe's model (the dimensions that decide parameter shapes)."""
    fix = ("give this model its own folder (checkpoint.save=runs/NAME checkpoint.load=runs/NAME), or set the"
           " model back to the checkpoint's")
    try:
        saved = preset_from_args(saved_args)
    except ConfigError as err:
        raise ConfigError(f"cannot resume from {load_dir}: {err.problem}", fix=fix, key="checkpoint.load") from None
    preset = recipe.preset
    differ = [f"{name} {getattr(saved, name)} (checkpoint) vs {getattr(preset, name)} (recipe)"
              for name in SHAPE_FIELDS if getattr(saved, name) != getattr(preset, name)]
    if differ:
        raise ConfigError(f"{load_dir} holds another model than the recipe's: {'; '.join(differ)}", fix=fix,
                          key="checkpoint.load")


def layout_of(args: argparse.Namespace) -> dict[str, object]:
    """The parallel sizes and pipeline schedule the arguments describe, by the names users see."""
    pp, vpp = args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size
    layout = getattr(args, "pipeline_model_parallel_layout", None)
    schedule = getattr(args, "pipeline_schedule", None) or default_schedule(
        pp, vpp, layout if isinstance(layout, str) else None)
    return {"TP": args.tensor_model_parallel_size, "PP": pp, "EP": args.expert_model_parallel_size,
            "ETP": args.expert_tensor_parallel_size, "CP": args.context_parallel_size,
            "DP": args.data_parallel_size, "schedule": SCHEDULE_NAMES[schedule] if pp > 1 else "none"}


def experts_apart(args: argparse.Namespace) -> bool:
    """Whether Megatron gives the expert parameters an optimizer of their own: when they are reduced
    over the expert-data-parallel group, i.e. EP > 1 or ETP != TP (``allreduce=False`` in
    ``megatron/core/tensor_parallel/layers.py``; ``get_megatron_optimizer`` chains the two)."""
    tp = args.tensor_model_parallel_size
    return bool(args.num_experts) and (args.expert_model_parallel_size > 1 or args.expert_tensor_parallel_size != tp)


def check_optimizer_layout(saved: argparse.Namespace, new: argparse.Namespace, content_metadata: dict,
                           load_dir: Path) -> None:
    """Refuse the layout changes whose optimizer state Megatron-Core 0.19 cannot load."""
    _check_expert_optimizer(saved, new, load_dir)
    _check_distributed_optimizer(saved, new, content_metadata.get("distrib_optim_sharding_type"), load_dir)


def _expert_sizes(args: argparse.Namespace) -> str:
    return (f"EP {args.expert_model_parallel_size} (ETP {args.expert_tensor_parallel_size},"
            f" TP {args.tensor_model_parallel_size})")


def _check_expert_optimizer(saved: argparse.Namespace, new: argparse.Namespace, load_dir: Path) -> None:
    """Measured: EP 1 -> 2 fails in ``ChainedOptimizer.load_state_dict`` ("Expected 2 entries in state
    dict, but got 4"), EP 2 -> 1 in the optimizer's param-group matching ("Could not find parameter group")."""
    if experts_apart(saved) == experts_apart(new):
        return
    where = {True: "in an optimizer of their own", False: "in the dense parameters' optimizer"}
    raise ConfigError(
        f"cannot resume {load_dir} under {_expert_sizes(new)}: it was saved under {_expert_sizes(saved)}, which"
        f" keeps the experts' optimizer state {where[experts_apart(saved)]}, and the new layout keeps it"
        f" {where[experts_apart(new)]}; Megatron-Core 0.19 cannot load one into the other",
        fix=f"resume with parallel.ep={saved.expert_model_parallel_size} parallel.etp="
        f"{saved.expert_tensor_parallel_size} parallel.tp={saved.tensor_model_parallel_size} (DP, PP and the pipeline"
        f" schedule may change), or start a new run from these weights with a fresh optimizer, LR schedule and step"
        f" count: checkpoint.load={load_dir} checkpoint.save=NEW_FOLDER -- --finetune",
        key="parallel.ep",
    )


def _check_distributed_optimizer(saved: argparse.Namespace, new: argparse.Namespace, sharding: str | None,
                                 load_dir: Path) -> None:
    """Megatron's own rule (``load_checkpoint``: "(TP, PP) mismatch after resume"), checked before loading."""
    tp_pp = (saved.tensor_model_parallel_size, saved.pipeline_model_parallel_size)
    new_tp_pp = (new.tensor_model_parallel_size, new.pipeline_model_parallel_size)
    if (not new.use_distributed_optimizer or sharding is None or tp_pp == new_tp_pp
            or sharding in DistributedOptimizer.checkpoint_fully_reshardable_formats):
        return
    raise ConfigError(
        f"cannot resume {load_dir} under TP {new_tp_pp[0]}, PP {new_tp_pp[1]}: its distributed-optimizer state"
        f" ({sharding}) was saved under TP {tp_pp[0]}, PP {tp_pp[1]} and reshards only over data-parallel ranks",
        fix=f"resume with parallel.tp={tp_pp[0]} parallel.pp={tp_pp[1]}; to change them afterwards, save a"
        " checkpoint with `-- --dist-ckpt-optim-fully-reshardable` and resume that one",
        key="parallel.pp",
    )
