"""The PyTorch FP8 backend (``torch._scaled_mm``) against the emulation, on an SM90 GPU.

Both backends take their operands from the one quantizer, so they multiply identical FP8 codes with
identical scales; the outputs may differ only by accumulation order inside cuBLAS's FP32
accumulator and by the final rounding to the output type.  Skipped, saying why, on machines where
block-wise ``torch._scaled_mm`` cannot run (no GPU, not Hopper, CUDA < 12.9).  The timing lives in
``benchmarks/gpu_fp8.py``.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dsv3.fp8 import emulation, scaled_mm
from megatron_dsv3.fp8.quantize import quantize
from megatron_dsv3.fp8.recipes import named_recipe

usable, reason = scaled_mm.scaled_mm_status()
pytestmark = pytest.mark.skipif(not usable, reason=f"block-wise torch._scaled_mm unavailable: {reason}")


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("m,n,k", [(256, 384, 512), (200, 136, 300), (4096, 2048, 7168), (512, 7168, 576)])
@pytest.mark.parametrize("blocks", [((1, 128), (128, 128)), ((1, 128), (1, 128)), ((128, 128), (1, 128))],
                         ids=["1x128-128x128", "1x128-1x128", "128x128-1x128"])
def test_scaled_mm_multiplies_the_same_fp8_codes_as_the_emulation(m, n, k, blocks):
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16)
    qa, qb = quantize(a, blocks[0]), quantize(b, blocks[1])
    cpu = quantize(a.cpu(), blocks[0])
    assert torch.equal(qa.data.cpu().view(torch.uint8), cpu.data.view(torch.uint8))  # one quantizer, any device
    assert torch.equal(qa.scale_inv.cpu(), cpu.scale_inv)
    reference = emulation.gemm(qa, qb, torch.float32)
    out = scaled_mm.gemm(qa, qb, torch.bfloat16)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert _rel(out, reference) < 4e-3  # bf16 output rounding (2^-8) dominates fp32 accumulation order


def test_the_fp8_linear_on_the_gpu_backend_matches_the_emulated_linear():
    pytest.importorskip("megatron.core", reason="the FP8 Linear uses Megatron's tensor-parallel mappings")
    from megatron_dsv3.fp8.linear import _FP8Linear
    from megatron_dsv3.fp8.plan import FP8Plan

    recipe = named_recipe("deepseek")
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(512, 1024, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(768, 1024, device="cuda", generator=g, dtype=torch.bfloat16) * 0.03
    dy = torch.randn(512, 768, device="cuda", generator=g, dtype=torch.bfloat16)
    results = {}
    for backend in ("pytorch", "emulated"):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = _FP8Linear.apply(xi, wi, None, FP8Plan(recipe=recipe, backend=backend), "test", False, False, None)
        y.backward(dy)
        results[backend] = (y.detach(), xi.grad, wi.grad)
    for got, want in zip(results["pytorch"], results["emulated"]):
        assert _rel(got, want) < 4e-3
