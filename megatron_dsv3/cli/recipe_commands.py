"""``args``, ``check``, ``schedule``: a recipe as Megatron's arguments, checked with its memory estimate, and
its pipeline step simulated beside Megatron's schedules."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from megatron_dsv3.errors import ConfigError
from megatron_dsv3.pipeline import compare


def add_recipe_arguments(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    """The recipe (a file or a shipped name) and its ``KEY=VALUE`` overrides, as every command takes them."""
    p.add_argument("recipe", nargs="?" if optional else None,
                   help="a recipe YAML file or the name of a shipped recipe"
                   + (" (default: dsv3-tiny-cpu)" if optional else ""))
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides, e.g. training.train_iters=50 parallel.ep=2")


def add_args_parser(sub) -> None:
    p = sub.add_parser("args", help="print a recipe as arguments for stock pretrain_gpt.py")
    add_recipe_arguments(p)
    p.add_argument("--world-size", type=int, default=None,
                   help="number of processes (default: the recipe's parallel.world_size)")
    p.add_argument("--format", choices=["words", "lines", "shell"], default="words",
                   help="words: space-separated, for $(...) (default); lines: one per line, for"
                   " mapfile; shell: quoted, for eval")
    p.set_defaults(func=cmd_args)


def cmd_args(ns: argparse.Namespace) -> int:
    # lazy: the recipe and the composer import torch (seconds); `megatron-dsv3 --help` must not.
    from megatron_dsv3.args.compose import recipe_argv
    from megatron_dsv3.recipe import load_recipe

    argv = recipe_argv(load_recipe(ns.recipe, ns.overrides), ns.world_size)
    if ns.format == "shell":
        print(shlex.join(argv))
    elif ns.format == "lines":
        print("\n".join(argv))
    else:
        # For `pretrain_gpt.py $(megatron-dsv3 args recipe.yaml)`: the shell splits the output at
        # whitespace without reading quotes, so an argument may not contain any.
        spaced = [a for a in argv if not a or any(c.isspace() for c in a)]
        if spaced:
            raise ConfigError(
                f"argument {spaced[0]!r} contains whitespace, which `$(megatron-dsv3 args ...)` would split",
                fix="use `--format lines` with `mapfile -t ARGS < <(megatron-dsv3 args ...)` and \"${ARGS[@]}\","
                " or `--format shell` with eval, or a path without spaces",
                key="args",
            )
        print(" ".join(argv))
    return 0


def add_check_parser(sub) -> None:
    p = sub.add_parser("check", help="validate a recipe and estimate its memory per GPU")
    add_recipe_arguments(p)
    p.add_argument("--world-size", type=int, default=None)
    p.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="GPU memory to check against (default: the recipe's hardware.gpu_memory_gb)")
    p.set_defaults(func=cmd_check)


def cmd_check(ns: argparse.Namespace) -> int:
    # lazy: the recipe imports torch (seconds); `megatron-dsv3 --help` must not.
    from megatron_dsv3.recipe import load_recipe, recipe_report

    try:
        report = recipe_report(load_recipe(ns.recipe, ns.overrides), ns.world_size, ns.gpu_memory_gb)
    except ConfigError as err:
        print(f"megatron-dsv3: error: {err}", file=sys.stderr)
        return 1
    if report.error is None:
        _check_resume(report)
    print(report.render())
    return 0 if report.ok else 1


def _check_resume(report) -> None:
    """What resuming the recipe's ``checkpoint.load`` does, when it holds a run (or why it cannot)."""
    # lazy: the composer imports torch; only `check` needs it
    from megatron_dsv3.args.compose import recipe_argv
    from megatron_dsv3.train.checkpoints import resume_step

    recipe = report.recipe
    try:
        step = resume_step(recipe.checkpoint.load)
        if step is None:
            return
        from megatron_dsv3.train.resume import plan_resume  # lazy: imports megatron.training (seconds)

        plan = plan_resume(recipe, recipe_argv(recipe, report.world_size), report.world_size, step)
    except ConfigError as err:
        report.error = err
        return
    report.resume = plan.lines() if plan is not None else [
        f"from step {step} of {recipe.checkpoint.load} (its format is not read ahead: schedule and layout unchecked)"]


def add_schedule_parser(sub) -> None:
    p = sub.add_parser(
        "schedule", help="simulate pipeline schedules (1F1B, interleaved, ZB1P, DualPipe, DualPipeV) side by side",
        description="Times each rank's operations in the order the schedule runs them (DualPipe and DualPipeV:"
        " the engine's own programs) with given costs, or with a cost model of a recipe (--recipe).")
    p.add_argument("--schedule", default="all", help="'all' or a comma-separated list (default: all)")
    p.add_argument("--pp", type=int, default=4, help="pipeline ranks (default 4)")
    p.add_argument("--microbatches", type=int, default=None,
                   help="micro-batches per step (default: 4 x pp, or the recipe's)")
    p.add_argument("--vpp", type=int, default=None, help="interleaved's chunks per rank (default 2)")
    p.add_argument("--f", type=float, default=1.0, help="forward time of a rank's share (default 1)")
    p.add_argument("--b", type=float, default=2.0, help="whole backward time (default 2)")
    p.add_argument("--w", type=float, default=1.0, help="the weight-gradient part of --b (default 1)")
    p.add_argument("--fb-cost", type=float, default=None,
                   help="an overlapped forward+backward pair (default: F + B, no overlap gain)")
    p.add_argument("--comm", type=float, default=0.0, help="a transfer between ranks (default 0)")
    p.add_argument("--no-zero-bubble", action="store_true", help="DualPipe(V) without the split backward")
    p.add_argument("--recipe", default=None, help="take pp, micro-batches and costs from a recipe's cost model")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides (with --recipe)")
    p.add_argument("--fb", action=argparse.BooleanOptionalAction, default=None,
                   help="with --recipe: DualPipe(V) overlap their pairs (default: as the recipe resolves"
                   " parallel.fb_overlap)")
    p.add_argument("--tflops", type=float, default=None, help="with --recipe: achieved TFLOP/s per GPU")
    p.add_argument("--ib-gbs", type=float, default=None, help="with --recipe: InfiniBand GB/s per GPU (50)")
    p.add_argument("--nvlink-gbs", type=float, default=None, help="with --recipe: NVLink GB/s per GPU (160)")
    p.add_argument("--order", action="store_true", help="print each rank's operations in order")
    p.add_argument("--json", action="store_true", help="machine-readable output (each rank's order under 'ranks')")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="draw the timelines (needs matplotlib)")
    p.set_defaults(func=cmd_schedule)


def cmd_schedule(ns: argparse.Namespace) -> int:
    schedules = compare.parse_schedules(ns.schedule)
    extra: dict = {}
    unit = ""
    if ns.recipe:
        # lazy: the recipe imports torch (seconds); the schedule without a recipe does not need it.
        from megatron_dsv3.recipe import load_recipe
        from megatron_dsv3.recipe.schedule import recipe_schedule

        simulated = recipe_schedule(load_recipe(ns.recipe, ns.overrides), tflops=ns.tflops, ib_gbs=ns.ib_gbs,
                                    nvlink_gbs=ns.nvlink_gbs, microbatches=ns.microbatches, vpp=ns.vpp,
                                    fb_overlap=ns.fb)
        pp, microbatches, vpp, costs_for = simulated.pp, simulated.microbatches, simulated.vpp, simulated.costs_for
        extra, unit = simulated.context, " ms"
        if not ns.json:
            print(simulated.summary)
    else:
        pp, microbatches, vpp = ns.pp, ns.microbatches or 2 * 2 * ns.pp, ns.vpp or 2
        costs = compare.Costs(F=ns.f, B=ns.b, W=ns.w, FB=ns.fb_cost, C=ns.comm)
        costs_for = lambda s: costs  # noqa: E731
    results = compare.compare(schedules, pp, microbatches, costs_for, vpp=vpp, zero_bubble=not ns.no_zero_bubble)
    if ns.json:
        print(json.dumps(compare.to_json(results, {"pp": pp, "microbatches": microbatches, **extra}), indent=2))
    else:
        if not ns.recipe:
            print(f"pp {pp}, {microbatches} micro-batches per step; costs per micro-batch and rank share: F {ns.f:g},"
                  f" B {ns.b:g} (W {ns.w:g}), F&B {ns.fb_cost if ns.fb_cost is not None else ns.f + ns.b:g},"
                  f" transfer {ns.comm:g}")
        print(compare.render_table(results, unit))
        if ns.order:
            print(compare.render_orders(results))
    if ns.plot:
        compare.plot(results, ns.plot, title=f"pp {pp}, {microbatches} micro-batches")
        if not ns.json:
            print(f"wrote {ns.plot}")
    return 0
