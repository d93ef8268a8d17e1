"""What a model's FP8 Linears run: a recipe and the backend that executes it, carried by the config.

``FP8Plan`` is decided once, where the job runs (:func:`megatron_dsv3.fp8.support.resolve_plan`,
called by :mod:`megatron_dsv3.args.settings`), and attached to every ``TransformerConfig`` Megatron
makes from the arguments (:func:`attach`), as the placement is.  The spec's provider
(:func:`megatron_dsv3.model.providers.provider_for`) reads it with :func:`plan_of`.

Backends: ``transformer_engine`` (Megatron's own FP8 path through TE's ``Float8BlockScaling``),
``pytorch`` (``torch._scaled_mm`` on an SM90 GPU, :mod:`megatron_dsv3.fp8.scaled_mm`) and
``emulated`` (any device, :mod:`megatron_dsv3.fp8.emulation`).  The last two share one quantizer
(:mod:`megatron_dsv3.fp8.quantize`) and one Linear (:mod:`megatron_dsv3.fp8.linear`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_dsv3.fp8.quantize import BlockQuantized, quantize_for
from megatron_dsv3.fp8.recipes import FP8Recipe

FP8_BACKENDS = ("auto", "transformer_engine", "pytorch", "emulated")
LOCAL_FP8_BACKENDS = ("pytorch", "emulated")  # run by our Linears on Megatron's local backend
_ATTRIBUTE = "dsv3_fp8"


@dataclass(frozen=True)
class FP8Plan:
    recipe: FP8Recipe
    backend: str  # transformer_engine | pytorch | emulated (resolved, never auto)

    def quantize(self, x: torch.Tensor, role: str, *, along: str = "cols", name: str = "") -> BlockQuantized:
        return quantize_for(x, self.recipe, role, along=along, name=name)

    def gemm(self, a: BlockQuantized, b: BlockQuantized, out_dtype: torch.dtype) -> torch.Tensor:
        """``a @ b^T`` on this plan's backend."""
        if self.backend == "emulated":
            from megatron_dsv3.fp8.emulation import gemm
        elif self.backend == "pytorch":
            from megatron_dsv3.fp8.scaled_mm import gemm
        else:
            raise ValueError(f"FP8 backend {self.backend!r} does not run our Linears (Transformer Engine runs its own)")
        return gemm(a, b, out_dtype)

    @property
    def runs_local_linears(self) -> bool:
        return self.backend in LOCAL_FP8_BACKENDS


def attach(config, plan: FP8Plan | None):
    """Give a Megatron ``TransformerConfig`` its FP8 plan (None: no FP8)."""
    setattr(config, _ATTRIBUTE, plan)
    return config


def plan_of(config) -> FP8Plan | None:
    """The FP8 plan a ``TransformerConfig`` (or ``GPTModelConfig``) carries, None without FP8."""
    config = getattr(config, "transformer", config)
    return getattr(config, _ATTRIBUTE, None)
