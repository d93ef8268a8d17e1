"""Block-wise FP8 numerics on the CPU: the quantizer, the emulated GEMM and the FP8 Linear's backward.

References are independent: per-block amax computed by looping over blocks in float64, the paper's
formula (scale = amax / 448, DeepSeek-V3 section 3.3.2), float64 matrix products of the dequantised
operands, and per-tensor scaling as the baseline block-wise scaling must beat on outliers
(measured with this emulation at 1024^3: 1x128 tiles 2.8e-2 vs per-tensor 3.7e-2 with 0.1% outliers x100).
"""

from __future__ import annotations

import bisect
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from megatron_dsv3.fp8.emulation import gemm
from megatron_dsv3.fp8.linear import _FP8Linear, weight_grad
from megatron_dsv3.fp8.plan import FP8Plan
from megatron_dsv3.fp8.quantize import FP8NonFiniteError, quantize, quantize_for
from megatron_dsv3.fp8.recipes import E4M3_MAX, named_recipe

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)

DEEPSEEK = named_recipe("deepseek")


def _blockwise_amax_loop(x: torch.Tensor, block):
    """Per-block amax by explicit loops, float64 (the reference for shapes, layout and partial blocks)."""
    br, bc = block
    rows, cols = x.shape
    out = torch.zeros(math.ceil(rows / br), math.ceil(cols / bc), dtype=torch.float64)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = x[i * br:(i + 1) * br, j * bc:(j + 1) * bc].double().abs().max()
    return out


@pytest.mark.parametrize("block", [(1, 128), (128, 128), (128, 1)], ids=["1x128", "128x128", "128x1"])
def test_scales_are_amax_over_448_per_block_with_partial_last_blocks(block):
    x = torch.randn(300, 200) * torch.logspace(-3, 2, 200)  # channels of very different magnitude
    q = quantize(x, block)
    amax = _blockwise_amax_loop(x, block)
    assert q.scale_inv.shape == amax.shape == (math.ceil(300 / block[0]), math.ceil(200 / block[1]))
    torch.testing.assert_close(q.scale_inv.double(), amax / E4M3_MAX, rtol=1e-6, atol=0)
    assert q.data.dtype == torch.float8_e4m3fn and q.data.shape == x.shape


# ---- codes and scales bit for bit against exact arithmetic ----
def _e4m3_values() -> list[Fraction]:
    """The finite non-negative float8_e4m3fn values in code order 0..126 (OCP FP8: 4 exponent bits with
    bias 7, 3 mantissa bits, subnormals at exponent 0; code 127 is NaN), built from the format."""
    values = []
    for code in range(127):
        exponent, mantissa = code >> 3, code & 7
        if exponent == 0:
            values.append(Fraction(mantissa, 8) * Fraction(1, 2**6))
        else:
            values.append((1 + Fraction(mantissa, 8)) * Fraction(2) ** (exponent - 7))
    return values


E4M3 = _e4m3_values()


def _to_e4m3(v: Fraction) -> Fraction:
    """``v`` saturated to +-448 and rounded to the nearest E4M3 value, ties to the even code."""
    magnitude = min(abs(v), E4M3[-1])
    i = bisect.bisect_right(E4M3, magnitude) - 1
    if i + 1 < len(E4M3):
        below, above = magnitude - E4M3[i], E4M3[i + 1] - magnitude
        if above < below or (above == below and (i + 1) % 2 == 0):
            i += 1
    return E4M3[i] if v >= 0 else -E4M3[i]


def _to_fp32(q: Fraction) -> Fraction:
    """``q`` rounded to the nearest fp32, ties to even (candidates from numpy, chosen exactly)."""
    guess = np.float32(float(q))
    candidates = [guess, np.nextafter(guess, np.float32(np.inf)), np.nextafter(guess, np.float32(-np.inf))]
    best = min(candidates, key=lambda c: (abs(Fraction(float(c)) - q), int(np.array(c).view(np.uint32)) & 1))
    return Fraction(float(best))


def _reference(x: torch.Tensor, block, scale: str, margin: int):
    """Scales and codes of ``x`` per ``block`` in exact rational arithmetic (DeepSeek-V3 3.3.2:
    scale = amax / 448 per block; with margin and power-of-two variants as the recipe defines them)."""
    rows, cols = x.shape
    values = [[Fraction(float(v)) for v in row] for row in x.double().tolist()]
    br, bc = block
    scales = [[None] * -(-cols // bc) for _ in range(-(-rows // br))]
    codes = [[None] * cols for _ in range(rows)]
    for i in range(len(scales)):
        for j in range(len(scales[0])):
            cells = [(r, c) for r in range(i * br, min(rows, (i + 1) * br))
                     for c in range(j * bc, min(cols, (j + 1) * bc))]
            quotient = max(abs(values[r][c]) for r, c in cells) * Fraction(2) ** margin / 448
            if scale == "pow2" and quotient > 0:
                power = Fraction(2) ** (quotient.numerator.bit_length() - quotient.denominator.bit_length() - 1)
                while power < quotient:
                    power *= 2
                quotient = power
            s = _to_fp32(quotient)
            s = s if s > 0 else Fraction(1)
            scales[i][j] = s
            for r, c in cells:
                codes[r][c] = _to_e4m3(values[r][c] / s)
    return scales, codes


def _bf16_tiles_with_ties(rows: int, cols: int, block) -> torch.Tensor:
    """BF16 data with partial blocks and, in block column 0: block row 0 with amax 105 (scale 15/64)
    and row 1 with amax 336 (scale 0.75) holding values exactly halfway between two E4M3 codes, the
    review's 0.5390625 at (row of block 1, column 1), and a false tie in block row 2; an all-zero
    block at block (0, 1)."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(rows, cols, generator=g) * torch.logspace(-2, 2, cols)).to(torch.bfloat16)
    br, bc = block
    midpoints = [(a + b) / 2 for a, b in zip(E4M3, E4M3[1:])]
    for amax, block_row in ((105, 0), (336, 1)):
        s = Fraction(amax, 448)
        ties = [float(t * s) for t in midpoints if float(t * s) == float(torch.tensor(float(t * s)).bfloat16())]
        values = torch.zeros(br * bc, dtype=torch.float64)
        ties = ties[: values.numel() - 1]
        values[0] = amax
        values[1:1 + len(ties)] = torch.tensor(ties, dtype=torch.float64) * (1 - 2 * (torch.arange(len(ties)) % 2))
        x[block_row * br:(block_row + 1) * br, :bc] = values.view(br, bc).to(torch.bfloat16)
    x[br, 1] = 0.5390625  # the review's example: 0.71875 * 0.75, halfway between codes 0.6875 and 0.75
    # A false tie: 114 / fl32(152 / 448) = 336.0000126, which one fp32 rounding makes 336, halfway
    # between the codes 320 and 352 (BF16's short mantissas make such ratios common).
    x[2 * br, :2] = torch.tensor([152.0, 114.0])
    x[:br, bc:2 * bc] = 0
    return x


@pytest.mark.parametrize("block,scale,margin", [((1, 128), "fp32", 0), ((128, 128), "fp32", 0),
                                                 ((1, 128), "fp32", 2), ((1, 128), "fp32", -1),
                                                 ((128, 128), "pow2", 0), ((1, 128), "pow2", 1)],
                         ids=["1x128", "128x128", "1x128-margin2", "1x128-margin-1", "128x128-pow2",
                              "1x128-pow2-margin1"])
def test_codes_and_scales_are_the_exactly_rounded_ones_bit_for_bit(block, scale, margin):
    """scale = fl32(amax * 2^margin / 448) and code = RNE_E4M3(x / scale), both rounded once from the
    exact quotient, on BF16 inputs including exact ties (0.5390625 in a tile of amax 336: scale 0.75,
    code 0.75, not 0.6875 as with amax * fl32(1/448)), a false tie (114 in a tile of amax 152: code
    352, not 320 as from the fp32 quotient), partial blocks and an all-zero block."""
    rows, cols = (260, 300) if block[0] == 128 else (6, 300)
    x = _bf16_tiles_with_ties(rows, cols, block)
    q = quantize(x, block, scale=scale, margin=margin)
    scales, codes = _reference(x, block, scale, margin)
    want_scales = torch.tensor([[float(s) for s in row] for row in scales], dtype=torch.float64)
    want_codes = torch.tensor([[float(c) for c in row] for row in codes], dtype=torch.float64)
    assert torch.equal(q.scale_inv.double(), want_scales)
    mismatch = (q.data.double() != want_codes).nonzero()
    assert mismatch.numel() == 0, f"{len(mismatch)} codes differ, first at {mismatch[0].tolist()}"
    if scale == "fp32" and margin == 0:  # the two cases the docstring names
        assert q.scale_inv[1, 0] == 0.75 and float(q.data[block[0], 1]) == 0.75
        assert float(q.data[2 * block[0], 1]) == 352
    assert torch.equal(q.scale_inv[0, 1], torch.tensor(1.0)) and not q.data[: block[0], 128:256].float().any()


def test_1x128_tiles_are_per_token_and_128_channels():
    x = torch.randn(4, 256)
    x[2, 130] = 1000.0  # one outlier: only its own tile (token 2, channels 128..255) sees it
    q = quantize(x, (1, 128))
    assert q.scale_inv[2, 1] == pytest.approx(1000.0 / 448, rel=1e-6)
    assert float(q.scale_inv[2, 0]) < 0.1 and float(q.scale_inv[1, 1]) < 0.1


def test_the_largest_element_of_a_block_saturates_at_448_and_margin_leaves_headroom():
    x = torch.randn(8, 384)
    codes = quantize(x, (1, 128)).data.float()
    assert float(codes.abs().max()) == E4M3_MAX
    tile_max = codes.view(8, 3, 128).abs().amax(-1)
    assert torch.all(tile_max == E4M3_MAX)  # every tile uses the whole range
    assert float(quantize(x, (1, 128), margin=1).data.float().abs().max()) <= E4M3_MAX / 2


def test_all_zero_blocks_get_unit_scales_and_zero_codes():
    x = torch.zeros(3, 256)
    x[1, :128] = torch.randn(128)
    q = quantize(x, (1, 128))
    assert torch.all(q.scale_inv[[0, 2]] == 1.0) and q.scale_inv[1, 1] == 1.0
    assert torch.isfinite(q.dequantize()).all()
    assert torch.all(q.data.float()[0] == 0)


def test_power_of_two_scales_are_exact_powers_and_never_overflow_448():
    x = torch.randn(64, 512) * 3.7
    q = quantize(x, (1, 128), scale="pow2")
    log2 = torch.log2(q.scale_inv.double())
    assert torch.equal(log2, torch.round(log2))
    amax = _blockwise_amax_loop(x, (1, 128))
    ratio = amax / q.scale_inv.double()  # the tile's largest code before saturation
    assert float(ratio.max()) <= E4M3_MAX and float(ratio.min()) > E4M3_MAX / 2


def test_dequantised_values_are_within_half_an_e4m3_step():
    x = torch.randn(32, 256)
    q = quantize(x, (1, 128))
    rel = ((q.dequantize() - x).abs() / x.abs())[x.abs() > q.scales_per_row().repeat_interleave(128, 1) * 2**-6]
    assert float(rel.max()) <= 2**-4 + 1e-6  # 3 mantissa bits: half a step is 1/16 of the value


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_input_is_a_clear_error_naming_the_tensor(bad):
    x = torch.randn(4, 256)
    x[1, 7] = bad
    with pytest.raises(FP8NonFiniteError, match="decoder.layers.3.mlp.linear_fc1's activation.*inf or NaN"):
        quantize_for(x, DEEPSEEK, "activation", name="decoder.layers.3.mlp.linear_fc1")


def test_tiny_blocks_neither_overflow_nor_produce_nan():
    x = torch.full((2, 128), 1e-39)  # subnormal fp32
    q = quantize(x, (1, 128))
    assert torch.isfinite(q.scale_inv).all() and torch.isfinite(q.dequantize()).all()


def test_an_expert_without_tokens_gets_empty_outputs_and_a_zero_weight_gradient():
    x = torch.zeros(0, 256, requires_grad=True)
    w = torch.randn(64, 256, requires_grad=True)
    y = _FP8Linear.apply(x, w, None, EMULATED, "test", False, False, None)
    y.sum().backward()
    assert y.shape == (0, 64) and x.grad.shape == (0, 256) and torch.equal(w.grad, torch.zeros_like(w))


def test_quantising_along_rows_tiles_each_column_over_128_tokens():
    """The weight-gradient operand x^T: a 1x128 tile of x^T is 128 consecutive tokens of one channel."""
    x = torch.randn(300, 64)
    along_rows = quantize_for(x, DEEPSEEK, "activation", along="rows")
    direct = quantize(x.t().contiguous(), (1, 128))
    assert along_rows.shape == (64, 300) and along_rows.block == (1, 128)
    assert torch.equal(along_rows.data.float(), direct.data.float())
    assert torch.equal(along_rows.scale_inv, direct.scale_inv)


# ---- the emulated GEMM ----
def test_emulated_gemm_equals_the_float64_product_of_the_dequantised_operands():
    a, b = torch.randn(70, 300), torch.randn(90, 300)  # K = 300: two full chunks and a partial one
    qa, qb = quantize(a, (1, 128)), quantize(b, (128, 128))
    expected = qa.dequantize(torch.float64) @ qb.dequantize(torch.float64).t()
    out = gemm(qa, qb)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=2e-6, atol=2e-5)


def _rel_error(a, b):
    return float((a.double() - b).norm() / b.norm())


def _fp8_gemm_error(a, b, a_block, b_block, scale="fp32"):
    exact = a.double() @ b.double().t()
    return _rel_error(gemm(quantize(a, a_block, scale=scale), quantize(b, b_block, scale=scale)), exact)


def test_fine_grained_scaling_beats_per_tensor_scaling_on_outliers():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 1024, generator=g), torch.randn(256, 1024, generator=g)
    outliers = torch.rand(a.shape, generator=g) < 1e-3
    a_out = torch.where(outliers, a * 100, a)
    gaussian = _fp8_gemm_error(a, b, (1, 128), (128, 128))
    blockwise = _fp8_gemm_error(a_out, b, (1, 128), (128, 128))
    per_tensor = _fp8_gemm_error(a_out, b, tuple(a.shape), tuple(b.shape))
    pow2 = _fp8_gemm_error(a_out, b, (1, 128), (128, 128), scale="pow2")
    assert gaussian < 0.05  # measured: about 3.7e-2 on Gaussian data at 1024^3
    assert blockwise < 0.8 * per_tensor, (blockwise, per_tensor)
    assert blockwise < pow2  # fp32 scales use the whole E4M3 range; powers of two waste up to 1 bit


# ---- the FP8 Linear's three GEMMs ----
EMULATED = FP8Plan(recipe=DEEPSEEK, backend="emulated")


def _dq(t, block):
    return quantize(t, block).dequantize(torch.float64)


def test_backward_quantises_gradients_per_token_and_wgrad_inputs_along_tokens():
    """Fprop x(1x128) W(128x128); Dgrad dy(1x128 along N) W^T(same blocks); Wgrad dy^T, x^T tiled along
    tokens (section 3.3.2), each checked against float64 products of operands quantised that way."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 256, generator=g, requires_grad=True)
    w = (torch.randn(384, 256, generator=g) * 0.05).requires_grad_()
    dy = torch.randn(200, 384, generator=g)
    y = _FP8Linear.apply(x, w, None, EMULATED, "test", False, False, None)
    y.backward(dy)

    fprop = _dq(x.detach(), (1, 128)) @ _dq(w.detach(), (128, 128)).t()
    dgrad = _dq(dy, (1, 128)) @ _dq(w.detach(), (128, 128))
    wgrad = _dq(dy.t().contiguous(), (1, 128)) @ _dq(x.detach().t().contiguous(), (1, 128)).t()
    torch.testing.assert_close(y.detach().double(), fprop, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), dgrad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), wgrad, rtol=1e-5, atol=1e-4)
    # The test can fail: Wgrad operands tiled per token (the forward's axis) give another result.
    wrong = _dq(dy, (1, 128)).t() @ _dq(x.detach(), (1, 128))
    assert _rel_error(w.grad, wrong) > 1e-3


def test_a_deferred_fp8_weight_gradient_waits_in_the_zero_bubble_queue():
    from megatron_dsv3.model.wgrad import WGRAD

    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 128, generator=g, requires_grad=True)
    w = torch.randn(96, 128, generator=g).requires_grad_()
    dy = torch.randn(64, 96, generator=g)
    _FP8Linear.apply(x, w, None, EMULATED, "test", False, False, None).backward(dy)
    expected, x.grad, w.grad = w.grad.clone(), None, None
    with WGRAD.defer():
        _FP8Linear.apply(x, w, None, EMULATED, "test", False, False, None).backward(dy)
    assert w.grad is None and x.grad is not None and len(WGRAD) == 1
    WGRAD.pop()
    assert torch.equal(w.grad, expected)


def test_token_segments_restart_the_weight_gradient_tiles():
    """Tokens from two expert-parallel ranks: the gradient is the sum over each rank's tokens, which
    one long tile run over the concatenation does not give."""
    g = torch.Generator().manual_seed(3)
    dy, x = torch.randn(300, 64, generator=g), torch.randn(300, 32, generator=g)
    segmented = weight_grad(EMULATED, dy, x, segments=[170, 130])
    parts = weight_grad(EMULATED, dy[:170], x[:170]) + weight_grad(EMULATED, dy[170:], x[170:])
    torch.testing.assert_close(segmented, parts, rtol=1e-6, atol=1e-6)
    assert _rel_error(weight_grad(EMULATED, dy, x), parts.double()) > 1e-4
