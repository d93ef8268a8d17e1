"""The block-wise FP8 quantizer as one compiled function: the same codes and scales as the eager one, in one pass.

The eager quantizer (:mod:`megatron_dsv3.fp8.quantize`, the reference) makes about a dozen
elementwise passes over the tensor, several in float64, to round each code as the exact quotient
``x / scale_inv`` would round (its round-to-odd step).  :func:`fused_quantize` computes the same
function in a form ``torch.compile`` fuses into one kernel (C++ on the CPU, Triton on a GPU): block
amax, scale, codes, and for the weight-gradient operands the transposed layout, written contiguous.

It is bit-identical by construction, not by luck of the compiler.  The quotient is taken in float64,
``Q64 = x / scale_inv`` with both operands exact there: a float64 division is correctly rounded on
both back ends (Triton's float32 ``/`` is not: it lowers to the approximate ``div.full.f32``,
triton-lang/triton#10661, which is why the eager form's float32 quotient is not used here).  Round to
odd at float32 is then read off ``Q64``: ``x`` and ``scale_inv`` have 24-bit significands, so an
exact quotient that is not a float32 lies at least 2^-47 (relative) from every float32, far more
than float64's rounding error; hence ``Q64`` lands on a float32 only when the quotient is that
float32, and no float32 lies between the quotient and ``Q64``.  Truncating ``Q64`` to float32
toward zero and setting the last bit when it was inexact is the quotient rounded to odd, which the
cast to E4M3 rounds as the exact quotient (Boldo and Melquiond, as in the eager form).  Power-of-two
scales take the exponent bits of the float64 quotient instead of ``frexp``.

``tests/test_fp8_fused_quantize.py`` holds it bit for bit against the eager quantizer on the CPU;
``tests/test_gpu.py`` on a GPU (Triton).  Non-finite inputs raise as in the eager form (on a GPU
through an asynchronous device assertion).
"""

from __future__ import annotations

import functools

import torch

from megatron_dsv3.fp8.quantize import FP8_DTYPE, BlockQuantized, FP8NonFiniteError, quantize
from megatron_dsv3.fp8.recipes import E4M3_MAX, FP8Recipe

_MANTISSA_BITS_64 = 52


def _ceil_div(a, b):
    return -(-a // b)


def _scale_inv(amax: torch.Tensor, scale: str, margin: int, amax_epsilon: float) -> torch.Tensor:
    """:func:`megatron_dsv3.fp8.quantize.scale_inv_from_amax` in compile-friendly operations."""
    if amax_epsilon > 0:
        amax = amax.clamp_min(amax_epsilon)
    quotient = amax.to(torch.float64) * (2.0**margin) / E4M3_MAX
    if scale == "pow2":  # the smallest power of two >= quotient: from its float64 bits
        bits = quotient.view(torch.int64)
        mantissa = bits & ((1 << _MANTISSA_BITS_64) - 1)
        exponent = bits >> _MANTISSA_BITS_64  # quotient >= 0: no sign bit
        up = ((exponent + 1) << _MANTISSA_BITS_64).view(torch.float64)
        quotient = torch.where(mantissa == 0, quotient, up)
    scale_inv = quotient.to(torch.float32)
    return torch.where(scale_inv > 0, scale_inv, torch.ones_like(scale_inv))


def _codes(blocks: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """E4M3 codes of ``blocks / scale_inv``, rounded as the exact quotient (see the module docstring)."""
    exact = blocks.to(torch.float64) / scale_inv.to(torch.float64)
    nearest = exact.to(torch.float32)
    bits = nearest.view(torch.int32)
    bits = bits - (nearest.to(torch.float64).abs() > exact.abs()).to(torch.int32)  # toward zero
    truncated = bits.view(torch.float32)
    odd = torch.where(truncated.to(torch.float64) != exact, bits | 1, bits).view(torch.float32)
    return odd.clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def _quantize(x: torch.Tensor, rows_per_block: int, cols_per_block: int, scale: str, margin: int,
              amax_epsilon: float, transpose: bool):
    rows, cols = x.shape
    nr, nc = _ceil_div(rows, rows_per_block), _ceil_div(cols, cols_per_block)
    xf = torch.nn.functional.pad(x.to(torch.float32), (0, nc * cols_per_block - cols, 0, nr * rows_per_block - rows))
    blocks = xf.view(nr, rows_per_block, nc, cols_per_block)
    amax = blocks.abs().amax(dim=(1, 3))
    finite = torch.isfinite(amax).all()
    scale_inv = _scale_inv(amax, scale, margin, amax_epsilon)
    codes = _codes(blocks, scale_inv[:, None, :, None]).view(nr * rows_per_block, nc * cols_per_block)[:rows, :cols]
    if transpose:
        return codes.t().contiguous(), scale_inv.t().contiguous(), finite
    return codes.contiguous(), scale_inv, finite


@functools.cache
def _compiled():
    return torch.compile(_quantize, dynamic=True, fullgraph=True)


def fused_quantize(x: torch.Tensor, block: tuple[int, int], *, scale: str = "fp32", margin: int = 0,
                   amax_epsilon: float = 0.0, role: str = "a tensor", transpose: bool = False) -> BlockQuantized:
    """:func:`megatron_dsv3.fp8.quantize.quantize` (``transpose=False``) or its transpose
    ``quantize(x, block).t()`` with the codes written contiguous (``transpose=True``), compiled."""
    if x.dim() != 2:
        raise ValueError(f"quantize expects a 2-D tensor, got shape {tuple(x.shape)}")
    if scale not in ("fp32", "pow2"):
        raise ValueError(f"unknown scale type {scale!r}")
    if x.shape[0] == 0 or x.shape[1] == 0:  # nothing to fuse; the eager form handles the empty shapes
        q = quantize(x, block, scale=scale, margin=margin, amax_epsilon=amax_epsilon, role=role)
        return q.t() if transpose else q
    codes, scale_inv, finite = _compiled()(x, block[0], block[1], scale, margin, float(amax_epsilon), transpose)
    message = (f"FP8 quantisation of {role}: the tensor holds inf or NaN, which E4M3 cannot represent"
               " (training diverged, or the data is broken); lower the learning rate, check the inputs,"
               " or keep this module in BF16")
    if finite.is_cuda:
        torch._assert_async(finite, message)
    elif not bool(finite):
        raise FP8NonFiniteError(message)
    return BlockQuantized(codes, scale_inv, (block[1], block[0]) if transpose else tuple(block))


def fused_quantize_for(x: torch.Tensor, recipe: FP8Recipe, role: str, *, along: str = "cols",
                       name: str = "") -> BlockQuantized:
    """:func:`megatron_dsv3.fp8.quantize.quantize_for`, compiled; ``along="rows"`` writes ``x^T``'s
    codes contiguous (what ``torch._scaled_mm`` reads for the weight-gradient GEMM)."""
    block = recipe.block(role)
    kwargs = dict(scale=recipe.scale, margin=recipe.margin, amax_epsilon=recipe.amax_epsilon,
                  role=f"{name or 'a linear'}'s {role}")
    if along == "cols":
        return fused_quantize(x, block, **kwargs)
    return fused_quantize(x, (block[1], block[0]), transpose=True, **kwargs)
