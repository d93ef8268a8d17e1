"""The fused FP8 quantizer gives the eager quantizer's codes and scales, bit for bit.

The eager quantizer (``megatron_dsv3.fp8.quantize``) is the reference: exact scales and codes rounded
as the exact quotient would round (its round-to-odd step).  The fused form computes them differently
(a float64 quotient, round to odd read off it; ``megatron_dsv3.fp8.fused_quantize``) so that one
compiled kernel can: these tests hold the formulation to the reference on inputs built to hit its
edges (false ties of a float32 division, partial and all-zero blocks, values that flush to zero,
power-of-two scales, margins, amax floors, the transposed Wgrad layout), run eagerly in the default
run, and compiled by ``torch.compile``'s C++ back end in the slow run (``tests/test_gpu.py``: Triton).
"""

from __future__ import annotations

import pytest
import torch

from megatron_dsv3.fp8.fused_quantize import _quantize, fused_quantize, fused_quantize_for
from megatron_dsv3.fp8.quantize import FP8NonFiniteError, quantize, quantize_for
from megatron_dsv3.fp8.recipes import named_recipe


def _hard_tensor(rows: int, cols: int, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    """Random values over 12 decades in bf16 (short mantissas: many E4M3 ties), an all-zero row
    block, values that underflow the scale, and the false tie 114 / fl32(152 / 448) = 336.0000126."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-6, 6, cols)
    x[:, :128] = torch.randint(-448, 449, (rows, 128), generator=g).float()  # integers: exact ties
    x[0, 128:256] = 114.0
    x[0, 130] = 152.0  # that block's amax: scale fl32(152/448); 114 / scale sits just above a tie
    if rows > 128:
        x[128:256] = 0.0
    x[1, 256:384] = 1e-30
    x[1, 257] = 1.0  # the rest of that block flushes to zero
    return x.to(dtype)


CASES = [  # (block, scale, margin, amax_epsilon, transpose)
    ((1, 128), "fp32", 0, 0.0, False),
    ((128, 128), "fp32", 0, 0.0, False),
    ((128, 1), "fp32", 0, 0.0, True),  # the Wgrad operand: tiles of 128 tokens, written transposed
    ((1, 128), "pow2", 0, 0.0, False),
    ((128, 128), "pow2", 1, 0.0, False),
    ((1, 128), "fp32", 2, 1e-3, False),
]


def _eager(x, block, scale, margin, eps, transpose):
    q = quantize(x, block, scale=scale, margin=margin, amax_epsilon=eps)
    return q.t() if transpose else q


def _same(codes, scale_inv, want) -> None:
    assert codes.shape == want.data.shape
    assert torch.equal(codes.view(torch.uint8), want.data.view(torch.uint8))
    assert torch.equal(scale_inv, want.scale_inv)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0][0]}x{c[0][1]}-{c[1]}-m{c[2]}{'-T' if c[4] else ''}")
@pytest.mark.quick
def test_the_fused_formulation_gives_the_eager_codes_and_scales_bit_for_bit(case, dtype):
    block, scale, margin, eps, transpose = case
    x = _hard_tensor(300, 576, dtype)  # partial blocks both ways (300 = 2 x 128 + 44; 576 = 4.5 x 128)
    codes, scale_inv, finite = _quantize(x, block[0], block[1], scale, margin, eps, transpose)
    want = _eager(x, block, scale, margin, eps, transpose)
    _same(codes, scale_inv, want)
    assert bool(finite) and codes.is_contiguous()


@pytest.mark.quick
def test_the_false_tie_is_rounded_as_the_exact_quotient():
    """A float32 quotient rounds 114 / fl32(152/448) onto the tie 336 (then to 320); the exact one is
    above it (352).  Both quantizers give 352."""
    x = _hard_tensor(2, 384, torch.float32)
    codes, _, _ = _quantize(x, 1, 128, "fp32", 0, 0.0, False)
    assert float(codes[0, 128].float()) == 352.0 == float(quantize(x, (1, 128)).data[0, 128].float())


@pytest.mark.quick
def test_the_fused_quantizer_refuses_non_finite_values_as_the_eager_one_does():
    x = _hard_tensor(4, 384, torch.float32)
    x[2, 7] = float("nan")
    assert not bool(_quantize(x, 1, 128, "fp32", 0, 0.0, False)[2])
    with pytest.raises(FP8NonFiniteError):
        quantize(x, (1, 128))


@pytest.mark.slow
def test_the_compiled_quantizer_equals_the_eager_one_bit_for_bit(monkeypatch):
    """``torch.compile`` (C++ on the CPU) keeps the formulation's exactness: every case, through the
    plan's entry point (``quantize_for`` against ``fused_quantize_for``); about a minute of compiling."""
    monkeypatch.setattr(torch._dynamo.config, "disable", False)
    recipe = named_recipe("deepseek")
    x = _hard_tensor(300, 576)
    for role in ("activation", "weight", "grad"):
        for along in ("cols", "rows"):
            got = fused_quantize_for(x, recipe, role, along=along)
            want = quantize_for(x, recipe, role, along=along)
            _same(got.data, got.scale_inv, want)
            assert got.block == want.block and got.data.is_contiguous()
    for block, scale, margin, eps, transpose in CASES[3:]:
        got = fused_quantize(x, block, scale=scale, margin=margin, amax_epsilon=eps, transpose=transpose)
        _same(got.data, got.scale_inv, _eager(x, block, scale, margin, eps, transpose))
    bad = x.clone()
    bad[3, 3] = float("inf")
    with pytest.raises(FP8NonFiniteError, match="inf or NaN"):
        fused_quantize(bad, (1, 128))
