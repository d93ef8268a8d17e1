"""``train``: a recipe on Megatron's own training loop, on this machine (``megatron_dsv3.train``)."""

from __future__ import annotations

import argparse
import os

from megatron_dsv3.cli.recipe_commands import add_recipe_arguments


def add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a recipe on Megatron's training loop (default: dsv3-tiny on the embedded corpus)",
        description="Train with Megatron-LM's own loop. Arguments after `--` go to Megatron as they are.",
    )
    add_recipe_arguments(p, optional=True)
    p.add_argument("--nproc", type=int, default=None,
                   help="processes on this machine (default: the recipe's parallel.world_size; gloo on CPU)")
    p.add_argument("--verbose", action="store_true", help="show Megatron's full output")
    p.set_defaults(func=cmd_train, megatron_args=[])


def cmd_train(ns: argparse.Namespace) -> int:
    # lazy: the launcher imports the recipe, the composer and torch (seconds); other commands must not.
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
