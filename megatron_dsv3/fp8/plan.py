"""What a model's FP8 Linears run: a recipe and the backend that executes it, carried by the config.

``FP8Plan`` is decided once, where the job runs (``fp8_plan`` in :mod:`megatron_dsv3.args.settings`,
with the refusals of :mod:`megatron_dsv3.fp8.support`), and every ``TransformerConfig`` Megatron makes
from the arguments carries it in its options (:func:`megatron_dsv3.fp8.provider.model_options`, which
also names the FP8 provider and the BF16 policy); FP8's modules read it with :func:`plan_of`.

Backends: ``transformer_engine`` (Megatron's own FP8 path through TE's ``Float8BlockScaling``),
``pytorch`` (``torch._scaled_mm`` on an SM90 GPU, :mod:`megatron_dsv3.fp8.scaled_mm`) and
``emulated`` (any device, :mod:`megatron_dsv3.fp8.emulation`).  The last two share one quantizer
(:mod:`megatron_dsv3.fp8.quantize`; on a GPU its compiled form, :mod:`megatron_dsv3.fp8.fused_quantize`,
which gives the same codes) and one Linear (:mod:`megatron_dsv3.fp8.linear`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_dsv3.fp8 import emulation, scaled_mm
from megatron_dsv3.fp8.fused_quantize import fused_quantize_for
from megatron_dsv3.fp8.quantize import BlockQuantized, quantize_for
from megatron_dsv3.fp8.recipes import FP8Recipe
from megatron_dsv3.model.options import options_of

FP8_BACKENDS = ("auto", "transformer_engine", "pytorch", "emulated")
LOCAL_FP8_BACKENDS = ("pytorch", "emulated")  # run by our Linears on Megatron's local backend


@dataclass(frozen=True)
class FP8Plan:
    recipe: FP8Recipe
    backend: str  # transformer_engine | pytorch | emulated (resolved, never auto)
    # eager: the reference quantizer; compiled: the same codes from one fused kernel
    # (megatron_dsv3.fp8.fused_quantize), what a GPU runs (torch.compile's first call compiles).
    quantizer: str = "eager"

    def quantize(self, x: torch.Tensor, role: str, *, along: str = "cols", name: str = "") -> BlockQuantized:
        if self.quantizer == "compiled":
            return fused_quantize_for(x, self.recipe, role, along=along, name=name)
        return quantize_for(x, self.recipe, role, along=along, name=name)

    def gemm(self, a: BlockQuantized, b: BlockQuantized, out_dtype: torch.dtype) -> torch.Tensor:
        """``a @ b^T`` on this plan's backend."""
        if self.backend == "emulated":
            return emulation.gemm(a, b, out_dtype)
        if self.backend == "pytorch":
            return scaled_mm.gemm(a, b, out_dtype)
        raise ValueError(f"FP8 backend {self.backend!r} does not run our Linears (Transformer Engine runs its own)")

    @property
    def runs_local_linears(self) -> bool:
        return self.backend in LOCAL_FP8_BACKENDS


def plan_of(config) -> FP8Plan | None:
    """The FP8 plan a ``TransformerConfig`` (or ``GPTModelConfig``) carries, None without FP8."""
    return options_of(config).fp8_plan
