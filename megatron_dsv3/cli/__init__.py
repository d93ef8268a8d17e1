"""The ``megatron-dsv3`` command: one parser, each subcommand's parser and handler beside each other.

* :mod:`.inspect_commands`: ``info``, ``specs``, ``changes``, ``hook`` (the model's figures and the plugin);
* :mod:`.recipe_commands`: ``args``, ``check``, ``schedule`` (a recipe as arguments, checked, simulated);
* :mod:`.train_commands`: ``train``; ``plot`` is :mod:`megatron_dsv3.train.plot`'s;
* :mod:`.convert_commands`: ``convert``;
* ``slurm`` and ``k8s``: :mod:`megatron_dsv3.cluster.commands`.

Every command builds the whole parser, so a command module imports only what is cheap at the top; a
handler imports the heavy layers (torch, Megatron) when it runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from megatron_dsv3 import __version__
from megatron_dsv3.cli import convert_commands, inspect_commands, recipe_commands, train_commands
from megatron_dsv3.cluster.commands import add_k8s_parser, add_slurm_parser
from megatron_dsv3.errors import ConfigError
from megatron_dsv3.train.plot import add_plot_parser

# In the order `megatron-dsv3 --help` lists them.
_PARSERS = (
    inspect_commands.add_info_parser,
    inspect_commands.add_changes_parser,
    recipe_commands.add_args_parser,
    recipe_commands.add_check_parser,
    train_commands.add_train_parser,
    recipe_commands.add_schedule_parser,
    convert_commands.add_convert_parser,
    add_slurm_parser,
    add_k8s_parser,
    add_plot_parser,
    inspect_commands.add_specs_parser,
    inspect_commands.add_hook_parser,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-dsv3",
        description="DeepSeek-V3 on Megatron-Core: presets, recipes, launch and training.",
    )
    parser.add_argument("--version", action="version", version=f"megatron-dsv3 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in _PARSERS:
        add_parser(sub)
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
    except BrokenPipeError:
        # The reader went away (`| head`, `| grep -q`): stop quietly, as a Unix tool does on SIGPIPE,
        # and keep Python's exit-time flush from raising again on the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
