"""Megatron configs for a preset, built through Megatron-LM's own argument parser.

``megatron_argv`` is the complete argument list (the same one ``megatron-dsv3 args`` prints), and
``parse_megatron_args`` runs Megatron's ``parse_args`` and ``validate_args`` on it, so a config made
here is the config ``pretrain_gpt.py`` would make from the same arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys

from megatron_dsv3.backend import resolve_backend
from megatron_dsv3.megatron_args import ParallelLayout, backend_args, cpu_args, model_args
from megatron_dsv3.presets import ModelPreset, get_preset
from megatron_dsv3.validation import validate


def _preset(preset: ModelPreset | str) -> ModelPreset:
    return get_preset(preset) if isinstance(preset, str) else preset


def megatron_argv(
    preset: ModelPreset | str,
    layout: ParallelLayout | None = None,
    *,
    backend: str = "auto",
    cpu: bool | None = None,
    micro_batch_size: int = 1,
    extra: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """Validate, then return Megatron-LM arguments for ``preset`` under ``layout``.

    ``cpu=None`` means "on CPU when no GPU is visible".  ``extra`` is appended last, so it can
    override anything before it.
    """
    preset = _preset(preset)
    layout = layout or ParallelLayout()
    validate(preset, layout)
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    resolved = "local" if cpu else resolve_backend(backend)
    if cpu and backend == "transformer_engine":
        resolve_backend(backend)  # raises the explanatory error
    argv = model_args(preset) + layout.args() + backend_args(resolved)
    if cpu:
        argv += cpu_args()
    argv += ["--micro-batch-size", str(micro_batch_size)]
    return argv + [str(a) for a in extra]


def parse_megatron_args(argv: list[str], *, quiet: bool = True) -> argparse.Namespace:
    """Megatron's ``parse_args`` + ``validate_args`` on ``argv`` (not ``sys.argv``), plus our options."""
    from megatron.training.arguments import parse_args, validate_args

    from megatron_dsv3.launch.arguments import add_dsv3_arguments, apply_dsv3_arguments

    saved = sys.argv
    sys.argv = ["megatron-dsv3"] + list(argv)
    try:
        args = parse_args(extra_args_provider=add_dsv3_arguments)
    finally:
        sys.argv = saved
    apply_dsv3_arguments(args)
    out = io.StringIO()
    with contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext():
        validate_args(args, {})
    return args


def transformer_config(
    preset: ModelPreset | str,
    layout: ParallelLayout | None = None,
    *,
    backend: str = "auto",
    cpu: bool | None = None,
    extra: list[str] | tuple[str, ...] = (),
):
    """The ``TransformerConfig`` (an ``MLATransformerConfig``) for ``preset`` under ``layout``."""
    from megatron.training.arguments import core_transformer_config_from_args

    args = parse_megatron_args(megatron_argv(preset, layout, backend=backend, cpu=cpu, extra=extra))
    return core_transformer_config_from_args(args)
