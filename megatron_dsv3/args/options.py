"""The plugin's own options, added to Megatron's argument parser as the group "megatron-dsv3".

What each option implies for Megatron's own arguments is written once, in
:mod:`megatron_dsv3.args.settings`, and applied on the machine that runs the job.
"""

from __future__ import annotations

import argparse

from megatron_dsv3.model.backends import BACKENDS
from megatron_dsv3.parallel.layout import SCHEDULES


def add_dsv3_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the megatron-dsv3 group to ``parser`` (idempotent)."""
    if any(a.dest == "dsv3_backend" for a in parser._actions):
        return parser
    group = parser.add_argument_group(
        title="megatron-dsv3", description="DeepSeek-V3 plugin options (megatron-dsv3)"
    )
    group.add_argument(
        "--dsv3-backend",
        choices=BACKENDS,
        default="auto",
        help="Modules of the dsv3 spec: Transformer Engine, Megatron's local PyTorch modules, or auto"
        " (Transformer Engine when it imports on a GPU, local otherwise; an explicit"
        " --transformer-impl local is kept). Sets --transformer-impl and what the backend needs.",
    )
    group.add_argument(
        "--dsv3-cpu",
        action="store_true",
        help="Run on CPU with the gloo backend (megatron_dsv3.cpu.enable_cpu_mode); for smoke tests"
        " and machines without a GPU.",
    )
    group.add_argument(
        "--pipeline-schedule",
        choices=SCHEDULES,
        default=None,
        help="Pipeline schedule: Megatron's 1f1b or interleaved (the default follows the virtual"
        " stages), or DeepSeek's dualpipe / dualpipev, whose --pipeline-model-parallel-layout lists"
        " the stages in model order.",
    )
    group.add_argument(
        "--dualpipe-zero-bubble",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="DualPipe(V): split the backwards the schedule marks into input- and weight-gradient parts"
        " (zero bubble; the default with the local backend); --no-dualpipe-zero-bubble runs every"
        " backward whole.",
    )
    group.add_argument(
        "--dualpipe-fb-overlap",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="DualPipe(V): run each paired forward and backward overlapped, attention / dispatch / MLP /"
        " combine interleaved (Megatron-Core's schedule plans), so one side's all-to-all hides behind the"
        " other's compute. Default: on with expert parallelism (--expert-model-parallel-size > 1).",
    )
    return parser
