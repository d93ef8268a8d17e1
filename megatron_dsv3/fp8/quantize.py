"""The one block-wise FP8 quantizer: the emulation and the PyTorch GPU backend both use it.

A 2-D tensor is cut into ``(rows, cols)`` blocks (``1 x 128`` tiles along K for activations and
activation gradients, ``128 x 128`` blocks for weights; DeepSeek-V3 section 3.3.2, figure 7a); each
block gets one fp32 scale from its own absolute maximum, computed from the current tensor (online,
not delayed):

    scale_inv = amax * 2^margin / 448          (fp32 scales, DeepSeek's; correctly rounded)
    scale_inv = 2^ceil(log2(amax * 2^margin / 448))   (power-of-two scales, Transformer Engine's default)
    q = saturate(x / scale_inv)  in float8_e4m3fn,      x ~= q * scale_inv

Both roundings are the exact ones: ``scale_inv`` is the fp32 nearest to the real quotient, and the
code is the E4M3 value nearest to the real ``x / scale_inv`` (ties to even), see
:func:`scale_inv_from_amax` and :func:`_e4m3_codes`.

``scale_inv`` is what Transformer Engine and ``torch._scaled_mm`` call the (de)quantisation scale.
Shapes that are not multiples of the block keep a partial last block, whose amax covers only the
elements it holds.  Documented edge cases:

* an all-zero block gets ``scale_inv = 1`` and zero codes (no division by zero);
* a block whose amax is so small that ``amax / 448`` underflows fp32 to zero gets ``scale_inv = 1``
  (its codes flush to zero);
* a non-finite value (inf or NaN) anywhere is an :class:`FP8NonFiniteError` naming the tensor, on
  the CPU at once and on a GPU through an asynchronous device assertion (no host sync), never a
  silent NaN weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_dsv3.fp8.recipes import E4M3_MAX, FP8Recipe

FP8_DTYPE = torch.float8_e4m3fn


class FP8NonFiniteError(FloatingPointError):
    """A tensor about to be quantised to FP8 holds inf or NaN (E4M3 has no inf; NaN would spread)."""


@dataclass
class BlockQuantized:
    """FP8 codes and one fp32 ``scale_inv`` per ``block`` of a 2-D tensor: ``x ~= data * scale_inv``."""

    data: torch.Tensor  # float8_e4m3fn, the tensor's shape
    scale_inv: torch.Tensor  # float32, (ceil(rows / block[0]), ceil(cols / block[1]))
    block: tuple[int, int]

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def t(self) -> "BlockQuantized":
        """The transpose: the same codes and scales, blocks transposed (free for 128x128 blocks,
        which is why DeepSeek chose them for weights: Dgrad reads ``W^T``)."""
        return BlockQuantized(self.data.t(), self.scale_inv.t(), (self.block[1], self.block[0]))

    def scales_per_row(self) -> torch.Tensor:
        """``(rows, ceil(cols / block[1]))``: the scale of every row's K-chunk."""
        return self.scale_inv.repeat_interleave(self.block[0], dim=0)[: self.data.shape[0]]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.data, self.scale_inv, self.block, dtype)


def dequantize(data: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``data * scale_inv`` over ``block``-sized blocks (partial edge blocks included: DeepSeek-V3's
    576-row ``kv_a_proj_with_mqa`` is 4.5 blocks of 128), in fp32 (an E4M3 value times an fp32 scale
    is rounded once), then cast to ``dtype``.  One block row at a time, so memory stays at one fp32
    copy of ``data`` (the checkpoint converter dequantises the released FP8 weights with it)."""
    rows, cols = data.shape
    out = data.to(torch.float32)
    for i in range(_ceil_div(rows, block[0])):
        out[i * block[0]:(i + 1) * block[0]] *= scale_inv[i].to(torch.float32).repeat_interleave(block[1])[:cols]
    return out.to(dtype)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``x`` in fp32 as a ``(row blocks, rows per block, column blocks, cols per block)`` view,
    zero-padded to whole blocks (zeros change no block's amax)."""
    rows, cols = x.shape
    br, bc = block
    nr, nc = _ceil_div(rows, br), _ceil_div(cols, bc)
    xf = x.to(torch.float32)
    if nr * br != rows or nc * bc != cols:
        xf = torch.nn.functional.pad(xf, (0, nc * bc - cols, 0, nr * br - rows))
    return xf.view(nr, br, nc, bc)


def block_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The absolute maximum of every block of the 2-D ``x`` (partial last blocks included), fp32."""
    return _blocks(x, block).abs().amax(dim=(1, 3))


def scale_inv_from_amax(amax: torch.Tensor, *, scale: str = "fp32", margin: int = 0,
                        amax_epsilon: float = 0.0) -> torch.Tensor:
    """``amax * 2^margin / 448`` correctly rounded to fp32 (``pow2``: the smallest power of two at
    least that quotient, so ``x / scale_inv`` never exceeds 448); 1 for blocks with nothing
    representable (all zero, or a quotient that underflows fp32).

    The quotient is formed in float64 and rounded once to fp32: ``amax * 2^margin`` is exact there,
    and a float64 quotient rounded to fp32 is the correctly rounded fp32 quotient (double rounding
    is harmless for division when 53 >= 2 * 24 + 2, Figueroa 1995).  Multiplying by ``fl32(1/448)``
    instead is one ulp high in about half the blocks, which moves codes at rounding ties."""
    if amax_epsilon > 0:
        amax = amax.clamp_min(amax_epsilon)
    quotient = amax.to(torch.float64) * 2.0**margin / E4M3_MAX
    if scale == "pow2":
        # amax / 448 = (amax / 7) / 64 is a power of two only when amax = 7 * 2^j exactly; otherwise
        # its binary expansion repeats 001, so float64 cannot round it onto a power of two either.
        mantissa, exponent = torch.frexp(quotient)  # quotient = mantissa * 2^exponent, mantissa in [0.5, 1)
        exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
        quotient = torch.ldexp(torch.ones_like(quotient), exponent)
    elif scale != "fp32":
        raise ValueError(f"unknown scale type {scale!r}")
    scale_inv = quotient.to(torch.float32)
    return torch.where(scale_inv > 0, scale_inv, torch.ones_like(scale_inv))


def _check_finite(amax: torch.Tensor, role: str) -> None:
    message = (f"FP8 quantisation of {role}: the tensor holds inf or NaN, which E4M3 cannot represent"
               " (training diverged, or the data is broken); lower the learning rate, check the inputs,"
               " or keep this module in BF16")
    if amax.is_cuda:
        torch._assert_async(torch.isfinite(amax).all(), message)
    elif not bool(torch.isfinite(amax).all()):
        raise FP8NonFiniteError(message)


def _e4m3_codes(x: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """``saturate(x / scale_inv)`` rounded to the nearest E4M3 value, ties to even, as if from the
    exact quotient.  An fp32 quotient rounded again to E4M3 can land on a false tie (114 / fl32(152 /
    448) = 336.0000126 is 336.0 in fp32, halfway between the codes 320 and 352; BF16's short mantissas
    make such ratios common), so the fp32 quotient is first rounded to odd: an inexact quotient is
    truncated and its last bit set.  A value rounded to odd with at least two more bits than the
    target rounds as the exact value would (Boldo and Melquiond, "Emulation of FMA and correctly
    rounded sums: proved algorithms using rounding to odd", IEEE TC 2008).  Whether the quotient is
    exact, and on which side, is the sign of the residual ``x - q * s``, exact in float64 (q * s has 48
    bits).  The cost is about a dozen more elementwise passes than a plain division and cast."""
    quotient = x / scale_inv
    residual = torch.addcmul(x.to(torch.float64), quotient.to(torch.float64), scale_inv.to(torch.float64), value=-1)
    bits = quotient.view(torch.int32)  # sign and magnitude: bits - 1 is one ulp toward zero
    truncated = bits - ((residual < 0) != (quotient < 0)).to(torch.int32)
    odd = torch.where((residual != 0) & (quotient != 0), truncated | 1, bits).view(torch.float32)
    return odd.clamp_(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def quantize(x: torch.Tensor, block: tuple[int, int], *, scale: str = "fp32", margin: int = 0,
             amax_epsilon: float = 0.0, role: str = "a tensor") -> BlockQuantized:
    """``x`` (2-D) as FP8 codes with one scale per ``block``; see the module docstring."""
    if x.dim() != 2:
        raise ValueError(f"quantize expects a 2-D tensor, got shape {tuple(x.shape)}")
    rows, cols = x.shape
    blocks = _blocks(x, block)
    amax = blocks.abs().amax(dim=(1, 3))
    _check_finite(amax, role)
    scale_inv = scale_inv_from_amax(amax, scale=scale, margin=margin, amax_epsilon=amax_epsilon)
    codes = _e4m3_codes(blocks, scale_inv[:, None, :, None])
    codes = codes.view(blocks.shape[0] * blocks.shape[1], blocks.shape[2] * blocks.shape[3])
    if codes.shape != x.shape:
        codes = codes[:rows, :cols].contiguous()
    return BlockQuantized(codes, scale_inv, tuple(block))


def quantize_for(x: torch.Tensor, recipe: FP8Recipe, role: str, *, along: str = "cols",
                 name: str = "") -> BlockQuantized:
    """``x`` quantised for a GEMM that contracts it along ``along`` ("cols": K is the last dim;
    "rows": K is the first, e.g. tokens in the weight-gradient GEMM).  For ``along="rows"`` the result
    is the transposed operand ``x^T`` (K last), quantised in the recipe's blocks for ``role``
    transposed: a 1x128 tile of ``x^T`` is 128 consecutive rows of one column of ``x``."""
    block = recipe.block(role)
    what = f"{name or 'a linear'}'s {role}"
    kwargs = dict(scale=recipe.scale, margin=recipe.margin, amax_epsilon=recipe.amax_epsilon, role=what)
    if along == "cols":
        return quantize(x, block, **kwargs)
    return quantize(x, (block[1], block[0]), **kwargs).t()
