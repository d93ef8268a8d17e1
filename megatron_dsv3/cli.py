"""The ``megatron-dsv3`` command."""

from __future__ import annotations

import argparse
import json
import sys

from megatron_dsv3.errors import ConfigError


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B" if not unit else "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def cmd_info(ns: argparse.Namespace) -> int:
    from megatron_dsv3.model.accounting import count
    from megatron_dsv3.model.presets import get_preset

    preset = get_preset(ns.preset)
    counts = count(preset)
    if ns.json:
        print(json.dumps({"preset": preset.name, **counts.to_dict()}, indent=2))
        return 0
    rows = [
        ("preset", f"{preset.name}: {preset.description}"),
        ("total parameters", f"{_human(counts.total_params)} ({counts.total_params:,})"),
        ("activated per token", f"{_human(counts.active_params)} ({counts.active_params:,})"),
        ("MTP parameters", f"{_human(counts.mtp_params)} ({counts.mtp_params:,}), depth {preset.mtp_num_layers}"),
        ("KV cache per token", f"{counts.kv_cache_bytes_per_token:,} bytes (BF16, MLA latent + rope key)"),
        ("training FLOPs per token", f"{_human(counts.flops_per_token, 'FLOP')} at seq {preset.seq_length}"
         f" (+{_human(counts.mtp_flops_per_token, 'FLOP')} for MTP)"),
        ("layers", f"{preset.num_layers} ({preset.first_k_dense} dense, {preset.num_moe_layers} MoE)"),
        ("experts", f"{preset.num_routed_experts} routed + {preset.num_shared_experts} shared,"
         f" top-{preset.moe_router_topk}, {preset.score_function} scores"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_changes(ns: argparse.Namespace) -> int:
    from megatron_dsv3.runtime.catalog import all_changes, render_markdown

    if ns.markdown:
        sys.stdout.write(render_markdown())
        return 0
    for change in all_changes():
        first = change.reason.split("\n")[0]
        print(f"[{change.group}] {change.name}: {first}")
        print(f"    replaces {', '.join(change.targets)}")
    return 0


def cmd_args(ns: argparse.Namespace) -> int:
    import shlex

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


def cmd_check(ns: argparse.Namespace) -> int:
    from megatron_dsv3.recipe import recipe_report, load_recipe

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
    from megatron_dsv3.args.compose import recipe_argv  # lazy: each command imports what it runs
    from megatron_dsv3.train.checkpoints import resume_step  # lazy: as above

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


def cmd_convert(ns: argparse.Namespace) -> int:
    """A conversion stopped by Ctrl-C, a bad input or the disk says so in a line or two (what happened
    and what became of the partial output); an unexpected error keeps its traceback."""
    try:
        return _convert(ns)
    except KeyboardInterrupt as err:
        _stopped("interrupted", err)
        return 130
    except ConfigError as err:
        _stopped(f"error: {err}", err)
        return 2
    except OSError as err:
        _stopped(f"error: {err.strerror or err}{f' ({err.filename})' if err.filename else ''}", err)
        return 1


def _stopped(message: str, err: BaseException) -> None:
    print(f"megatron-dsv3: {message}", file=sys.stderr)
    for note in getattr(err, "__notes__", []):
        print(f"megatron-dsv3: {note}", file=sys.stderr)


def _convert(ns: argparse.Namespace) -> int:
    from megatron_dsv3.convert import run

    if ns.direction == "hf-to-megatron":
        result = run.hf_to_megatron(ns.source, ns.out, recipe=ns.recipe, overrides=ns.overrides, dtype=ns.dtype,
                                    threads=ns.threads, overwrite=ns.overwrite, progress=not ns.quiet)
        loads = f"megatron-dsv3 train RECIPE checkpoint.load={result.out_dir}  (or pretrain_gpt.py --load {result.out_dir})"
    else:
        if ns.recipe or ns.overrides:
            raise ConfigError("--recipe is for hf-to-megatron; a Megatron checkpoint records its own model",
                              fix="drop --recipe", key="--recipe")
        shard = int(ns.max_shard_size * 1e9) if ns.max_shard_size else None
        result = run.megatron_to_hf(ns.source, ns.out, dtype=ns.dtype, max_shard_bytes=shard,
                                    threads=ns.threads, overwrite=ns.overwrite, progress=not ns.quiet)
        loads = f"transformers: AutoModelForCausalLM.from_pretrained({str(result.out_dir)!r})"
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {result.out_dir} ({result.preset.num_layers} layers, {result.bytes_written / 1e9:.2f} GB in"
          f" {result.seconds:.1f} s, {result.mb_per_s:.0f} MB/s)")
    print(f"load it with: {loads}")
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    import os

    from megatron_dsv3.train import launcher

    recipe, overrides = ns.recipe, list(ns.overrides)
    if recipe is not None and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        recipe, overrides = None, [recipe] + overrides  # `train training.train_iters=50`
    if launcher.under_torchrun():
        plan = launcher.plan(recipe, overrides, int(os.environ["WORLD_SIZE"]), ns.megatron_args)
        launcher.run_under_torchrun(plan)
        return 0
    plan = launcher.plan(recipe, overrides, ns.nproc, ns.megatron_args)
    return launcher.run(plan, verbose=ns.verbose)


def cmd_schedule(ns: argparse.Namespace) -> int:
    from megatron_dsv3.pipeline import compare

    schedules = compare.parse_schedules(ns.schedule)
    extra: dict = {}
    unit = ""
    if ns.recipe:
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


def _add_recipe_arguments(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    p.add_argument("recipe", nargs="?" if optional else None,
                   help="a recipe YAML file or the name of a shipped recipe"
                   + (" (default: dsv3-tiny-cpu)" if optional else ""))
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides, e.g. training.train_iters=50 parallel.ep=2")


def cmd_hook(ns: argparse.Namespace) -> int:
    from megatron_dsv3.launch import hook

    if ns.action == "install":
        print(f"installed {hook.install()}")
    elif ns.action == "uninstall":
        print("removed" if hook.uninstall() else "not installed", hook.pth_path())
    else:
        for key, value in hook.status().items():
            print(f"{key}: {value}")
    return 0


def cmd_specs(ns: argparse.Namespace) -> int:
    from megatron_dsv3.model.spec_names import registered_specs

    for name, target in sorted(registered_specs().items()):
        print(f"{name}  ->  {target}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from megatron_dsv3 import __version__
    from megatron_dsv3.model.presets import PRESETS

    parser = argparse.ArgumentParser(
        prog="megatron-dsv3",
        description="DeepSeek-V3 on Megatron-Core: presets, recipes, launch and training.",
    )
    parser.add_argument("--version", action="version", version=f"megatron-dsv3 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="parameter, KV-cache and FLOP counts of a model preset")
    p.add_argument("preset", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("changes", help="list every run-time change the plugin makes to Megatron")
    p.add_argument("--markdown", action="store_true", help="print docs/megatron-changes.md")
    p.set_defaults(func=cmd_changes)

    p = sub.add_parser("args", help="print a recipe as arguments for stock pretrain_gpt.py")
    _add_recipe_arguments(p)
    p.add_argument("--world-size", type=int, default=None,
                   help="number of processes (default: the recipe's parallel.world_size)")
    p.add_argument("--format", choices=["words", "lines", "shell"], default="words",
                   help="words: space-separated, for $(...) (default); lines: one per line, for"
                   " mapfile; shell: quoted, for eval")
    p.set_defaults(func=cmd_args)

    p = sub.add_parser("check", help="validate a recipe and estimate its memory per GPU")
    _add_recipe_arguments(p)
    p.add_argument("--world-size", type=int, default=None)
    p.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="GPU memory to check against (default: the recipe's hardware.gpu_memory_gb)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "train", help="train a recipe on Megatron's training loop (default: dsv3-tiny on the embedded corpus)",
        description="Train with Megatron-LM's own loop. Arguments after `--` go to Megatron as they are.",
    )
    _add_recipe_arguments(p, optional=True)
    p.add_argument("--nproc", type=int, default=None,
                   help="processes on this machine (default: the recipe's parallel.world_size; gloo on CPU)")
    p.add_argument("--verbose", action="store_true", help="show Megatron's full output")
    p.set_defaults(func=cmd_train, megatron_args=[])

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
                   help="with --recipe: DualPipe(V) overlap their pairs (default: as the recipe resolves parallel.fb_overlap)")
    p.add_argument("--tflops", type=float, default=None, help="with --recipe: achieved TFLOP/s per GPU")
    p.add_argument("--ib-gbs", type=float, default=None, help="with --recipe: InfiniBand GB/s per GPU (50)")
    p.add_argument("--nvlink-gbs", type=float, default=None, help="with --recipe: NVLink GB/s per GPU (160)")
    p.add_argument("--order", action="store_true", help="print each rank's operations in order")
    p.add_argument("--json", action="store_true", help="machine-readable output (each rank's order under 'ranks')")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="draw the timelines (needs matplotlib)")
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser(
        "convert", help="HuggingFace DeepSeek-V3 checkpoints to Megatron and back (streaming, bounded memory)",
        description="Streams tensors one at a time: peak memory is a few tensors whatever the checkpoint's size."
        " FP8 E4M3 weights (128x128 weight_scale_inv blocks) are dequantised on the way in. Output goes to a"
        " temporary folder renamed at the end. docs/checkpoints.md has the name table.")
    p.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    p.add_argument("source", help="hf-to-megatron: the HF folder (config.json, safetensors); megatron-to-hf: a"
                   " --save folder or one of its iter_NNNNNNN folders (torch_dist)")
    p.add_argument("out", help="the output folder (must be new or empty unless --overwrite)")
    p.add_argument("--recipe", default=None,
                   help="hf-to-megatron: the recipe the checkpoint is for (its model must agree with config.json)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides (with --recipe)")
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: the source's)")
    p.add_argument("--threads", type=int, default=2, help="tensors read and written concurrently (default 2)")
    p.add_argument("--max-shard-size", type=float, default=None,
                   help="megatron-to-hf: GB per safetensors shard (default 5)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT once the new one is complete")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_convert)

    from megatron_dsv3.cluster.commands import add_k8s_parser, add_slurm_parser
    from megatron_dsv3.train.plot import add_plot_parser

    add_slurm_parser(sub)
    add_k8s_parser(sub)
    add_plot_parser(sub)

    p = sub.add_parser("specs", help="list the spec names `--spec NAME` accepts")
    p.set_defaults(func=cmd_specs)

    p = sub.add_parser("hook", help="the start-up hook that wires --spec dsv3 into Megatron-LM")
    p.add_argument("action", choices=["status", "install", "uninstall"], nargs="?", default="status")
    p.set_defaults(func=cmd_hook)
    return parser


def _quiet_third_party() -> None:
    """Megatron warns on import about optional packages (apex, TE, absl) a CPU machine lacks."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(megatron|torch)\..*")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    _quiet_third_party()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:  # `megatron-dsv3 train ... -- --log-interval 5`: raw Megatron arguments
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    ns, rest = parser.parse_known_args(argv)
    # argparse stops collecting KEY=VALUE overrides at the first option (`args r.yaml --world-size 2
    # training.train_iters=5`); the leftovers of that form are overrides too.
    if rest:
        if not hasattr(ns, "overrides") or any(r.startswith("-") or "=" not in r for r in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        ns.overrides = list(ns.overrides) + rest
    if extra:
        if ns.command != "train":
            parser.error("arguments after `--` are only for `train`")
        ns.megatron_args = extra
    try:
        return ns.func(ns)
    except ConfigError as err:
        print(f"megatron-dsv3: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
