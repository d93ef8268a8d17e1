"""The plugin's own options, added to Megatron's argument parser as the group "megatron-dsv3"."""

from __future__ import annotations

import argparse

from megatron_dsv3.backend import BACKENDS


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
        " --transformer-impl local is kept). Sets --transformer-impl.",
    )
    group.add_argument(
        "--dsv3-cpu",
        action="store_true",
        help="Run on CPU with the gloo backend (megatron_dsv3.cpu.enable_cpu_mode); for smoke tests"
        " and machines without a GPU.",
    )
    return parser


def apply_dsv3_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Act on the plugin options right after parsing, before Megatron validates the arguments."""
    from megatron_dsv3.backend import resolve_backend

    if getattr(args, "dsv3_cpu", False):
        from megatron_dsv3.cpu import enable_cpu_mode

        enable_cpu_mode()
    requested = getattr(args, "dsv3_backend", "auto")
    if requested == "auto" and args.transformer_impl == "local":
        requested = "local"  # Megatron's own --transformer-impl local (its default is transformer_engine)
    backend = resolve_backend(requested)
    args.transformer_impl = backend
    if requested == "auto":
        # What backend_args() gives an explicit backend, decided here on the training machine.
        if backend == "local":
            args.gradient_accumulation_fusion = False  # a fused wgrad needs apex or TE
            args.moe_grouped_gemm = False  # local experts run one after another
        else:
            args.moe_grouped_gemm = True
    return args
