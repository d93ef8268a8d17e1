"""FP8 recipes: how each tensor of a Linear is quantised, as plain data (DeepSeek-V3 section 3.3).

A recipe says, for the three tensors every Linear's GEMMs read (activations, weights, activation
gradients), how they are cut into blocks that share one scale, how the scale is computed, and which
modules stay in BF16.  Two recipes are named:

* ``deepseek``: DeepSeek-V3's own (arXiv 2412.19437v2, section 3.3 and appendix B.2): E4M3 for
  every tensor; activations and activation gradients in 1x128 tiles (per token, 128 channels),
  weights in 128x128 blocks; scales computed online from the current tensor, ``amax / 448`` in
  fp32; partial sums promoted to FP32 every ``N_C = 128`` elements of K; AdamW moments in BF16 and
  master weights in FP32.
* ``te-blockwise``: Transformer Engine's ``Float8BlockScaling`` defaults: the same blocks, scales
  rounded to powers of two, optimizer states untouched.

Any field can be overridden (``with_overrides``); whether a backend or GPU can run the result is
decided in :mod:`megatron_dsv3.fp8.support`, never by silently changing the recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_dsv3.errors import ConfigError

E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
SCALES = ("fp32", "pow2")
BLOCK_KINDS = ("1d", "2d")  # 1d: 1 x block_size tiles along K; 2d: block_size x block_size blocks
MOMENTS = ("bf16", "fp32")
# Modules a recipe may also keep in BF16 (beyond the first / last layers).
OPTIONAL_BF16 = ("shared_experts", "mtp")
# Always BF16/FP32, whatever the recipe (section 3.3: "the embedding module, the output head, MoE
# gating modules, normalization operators, and attention operators"): none of them is a Linear of
# the spec, so no FP8 provider ever builds them.
ALWAYS_BF16 = ("embedding", "output head", "router (MoE gating)", "normalisation", "core attention")


@dataclass(frozen=True)
class FP8Recipe:
    """One FP8 recipe; see the module docstring and ``docs/fp8.md``."""

    name: str
    scale: str = "fp32"  # fp32: amax / 448; pow2: rounded up to a power of two
    block_size: int = 128  # tile length along K = the accumulation-promotion interval N_C
    activation_block: str = "1d"
    weight_block: str = "2d"
    grad_block: str = "1d"
    margin: int = 0  # scale = amax * 2^margin / 448 (headroom, as Transformer Engine's margin)
    amax_epsilon: float = 0.0  # amax floor, as Transformer Engine's QParams.amax_epsilon
    bf16_first_layers: int = 0
    bf16_last_layers: int = 0
    bf16_modules: tuple[str, ...] = ()
    moments: str = "fp32"  # AdamW exp_avg / exp_avg_sq storage (master weights stay FP32)
    format: str = "e4m3"  # E4M3 for every tensor (section 3.3.2); not a key

    def __post_init__(self):
        for name, value, choices in (("scale", self.scale, SCALES), ("moments", self.moments, MOMENTS),
                                     ("activation_block", self.activation_block, BLOCK_KINDS),
                                     ("weight_block", self.weight_block, BLOCK_KINDS),
                                     ("grad_block", self.grad_block, BLOCK_KINDS)):
            if value not in choices:
                raise ConfigError(f"fp8.{name}={value!r} is not one of {', '.join(choices)}",
                                  fix=f"set fp8.{name} to one of: {', '.join(choices)}", key=f"fp8.{name}",
                                  value=str(value), choices=list(choices))
        for name in ("block_size", "margin", "bf16_first_layers", "bf16_last_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name == "block_size" else 0):
                raise ConfigError(f"fp8.{name}={value!r} must be a {'positive' if name == 'block_size' else 'non-negative'}"
                                  " integer", fix=f"set fp8.{name} to an integer", key=f"fp8.{name}")
        if self.amax_epsilon < 0:
            raise ConfigError(f"fp8.amax_epsilon={self.amax_epsilon} is negative", fix="use 0 or a small"
                              " positive floor such as 1e-12", key="fp8.amax_epsilon")
        unknown = [m for m in self.bf16_modules if m not in OPTIONAL_BF16]
        if unknown:
            raise ConfigError(f"fp8.bf16_modules has {unknown}", fix=f"choose among {', '.join(OPTIONAL_BF16)}"
                              f" (always BF16: {', '.join(ALWAYS_BF16)})", key="fp8.bf16_modules",
                              value=str(unknown[0]), choices=list(OPTIONAL_BF16))

    def block(self, role: str) -> tuple[int, int]:
        """``(rows, cols)`` of one scaling block for ``role`` (activation / weight / grad), with K the
        columns: 1d is ``1 x block_size``, 2d ``block_size x block_size``."""
        kind = {"activation": self.activation_block, "weight": self.weight_block, "grad": self.grad_block}[role]
        return (1, self.block_size) if kind == "1d" else (self.block_size, self.block_size)

    def with_overrides(self, **overrides) -> "FP8Recipe":
        """This recipe with the given fields replaced (``None`` keeps a field)."""
        known = {f.name for f in dataclasses.fields(self)} - {"name", "format"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown FP8 recipe field(s) {unknown}", fix=f"use some of {sorted(known)}",
                              key="fp8", value=unknown[0], choices=sorted(known))
        changes = {k: (tuple(v) if k == "bf16_modules" else v) for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    def summary(self) -> str:
        blocks = "/".join(f"{r}x{c}" for r, c in (self.block("activation"), self.block("weight"), self.block("grad")))
        keep = []
        if self.bf16_first_layers:
            keep.append(f"first {self.bf16_first_layers} layers")
        if self.bf16_last_layers:
            keep.append(f"last {self.bf16_last_layers} layers")
        keep += list(self.bf16_modules)
        return (f"{self.name}: E4M3, {self.scale} scales, activation/weight/grad blocks {blocks}, promotion every"
                f" {self.block_size}, margin {self.margin}, moments {self.moments}"
                + (f", BF16 also: {', '.join(keep)}" if keep else ""))


RECIPES = {
    "deepseek": FP8Recipe(name="deepseek", scale="fp32", moments="bf16"),
    "te-blockwise": FP8Recipe(name="te-blockwise", scale="pow2", moments="fp32"),
}


def named_recipe(name: str) -> FP8Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown FP8 recipe '{name}'", fix=f"use one of: {', '.join(RECIPES)}",
                          key="fp8.recipe", value=name, choices=list(RECIPES)) from None
