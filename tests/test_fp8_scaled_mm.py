"""The PyTorch FP8 backend's ``torch._scaled_mm`` calls, checked on the CPU.

No GPU runs these tests, so every call the backend makes goes through
:class:`megatron_dsv3.testing.scaled_blas.ScaledBlasModel`, a model of PyTorch's block-wise checks
(``aten/src/ATen/native/cuda/ScaledBlas.cpp``) and of the scale layout cuBLAS reads, under both of
PyTorch's rules for a 128x128 scale's row stride (padded to a multiple of 4 chunks up to 2.9, exact from
2.10, PyTorch PR #164953).  The model multiplies the dequantised operands in
fp32; the reference is the emulation backend, which multiplies the same codes and scales chunk by
chunk, so the two agree to fp32 summation order.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dsv3.fp8 import emulation, scaled_mm
from megatron_dsv3.fp8.linear import _FP8Linear
from megatron_dsv3.fp8.plan import FP8Plan
from megatron_dsv3.fp8.quantize import quantize
from megatron_dsv3.fp8.recipes import named_recipe
from megatron_dsv3.testing.scaled_blas import RULES, OutOfBoundsScaleRead, ScaledBlasModel, rule_for

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)

DEEPSEEK = named_recipe("deepseek")
PYTORCH, EMULATED = FP8Plan(recipe=DEEPSEEK, backend="pytorch"), FP8Plan(recipe=DEEPSEEK, backend="emulated")


@pytest.fixture(params=RULES)
def model(request, monkeypatch):
    """``torch._scaled_mm`` replaced by the model, under PyTorch <= 2.9's or >= 2.10's rule."""
    blas = ScaledBlasModel(request.param)
    monkeypatch.setattr(torch, "_scaled_mm", blas)
    return blas


def _close(got, want):
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5 * float(want.abs().max()))


# ---- the model can fail: it rejects what PyTorch rejects ----
def _fp8(rows, cols):
    return torch.randn(rows, cols).to(torch.float8_e4m3fn)


def test_the_model_rejects_what_pytorch_rejects():
    exact, padded = ScaledBlasModel("exact"), ScaledBlasModel("padded")
    a, b = _fp8(256, 640), _fp8(256, 640)  # 5 K-chunks, two 128-row blocks
    ok_a = torch.ones(5, 256).t()  # 1x128 of mat1: (M, L), strides (1, M)
    exact_b = torch.ones(2, 5).t()  # 128x128 of mat2, for mat2^T: (2, 5) with row stride 5
    padded_b = torch.ones(2, 8)[:, :5].t()  # the same with row stride 8
    assert exact.scaling(a, b.t(), ok_a, exact_b) == ("1x128", "128x128")
    assert padded.scaling(a, b.t(), ok_a, padded_b) == ("1x128", "128x128")
    for blas, scale_b in ((exact, padded_b), (padded, exact_b)):  # each rule refuses the other's stride
        with pytest.raises(RuntimeError, match="Invalid scaling configuration"):
            blas(a, b.t(), ok_a, scale_b, out_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="Invalid scaling configuration"):  # 1x128 scale row-major
        exact(a, b.t(), torch.ones(256, 5), exact_b, out_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="Invalid scaling configuration"):  # an expert without tokens
        exact(_fp8(0, 640), b.t(), torch.ones(0, 5), exact_b, out_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="divisible by 16"):
        exact(_fp8(256, 200), _fp8(256, 200).t(), torch.ones(2, 256).t(), torch.ones(2, 2).t(),
              out_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="row-major and column-major"):
        exact(a, b.t().contiguous(), ok_a, exact_b, out_dtype=torch.float32)


def test_cublas_reads_a_128x128_scale_with_a_row_stride_of_four_chunks():
    """PyTorch >= 2.10 accepts a 5-chunk 128x128 scale with row stride 5, but cuBLAS reads rows 8
    apart (its documented K-major layout): the product would use the wrong scales, or read past them."""
    a, b = _fp8(256, 640), _fp8(256, 640)
    with pytest.raises(OutOfBoundsScaleRead, match="scale_b"):
        ScaledBlasModel("exact")(a, b.t(), torch.ones(5, 256).t(), torch.ones(2, 5).t(), out_dtype=torch.float32)


def test_the_torch_version_names_the_rule():
    versions = ("2.9.1+cu128", "2.10.0", "2.11.0+cu130", "3.0")
    assert [rule_for(v) for v in versions] == ["padded", "exact", "exact", "exact"]


# ---- every call the backend makes ----
@pytest.mark.parametrize("m,n,k", [(200, 576, 256), (200, 256, 576), (96, 136, 300), (16, 256, 7168)],
                         ids=["kv_a_proj-fprop", "kv_a_proj-dgrad-5-chunks", "partial-blocks", "one-token-block"])
@pytest.mark.parametrize("blocks", [((1, 128), (128, 128)), ((1, 128), (1, 128)), ((128, 128), (1, 128))],
                         ids=["1x128-128x128", "1x128-1x128", "128x128-1x128"])
def test_scaled_mm_gemms_pass_pytorchs_checks_and_equal_the_emulation(model, m, n, k, blocks):
    g = torch.Generator().manual_seed(0)
    qa = quantize(torch.randn(m, k, generator=g), blocks[0])
    qb = quantize(torch.randn(n, k, generator=g), blocks[1])
    out = scaled_mm.gemm(qa, qb, torch.float32)
    assert out.shape == (m, n) and len(model.calls) == 1 and not model.calls[0].use_fast_accum
    _close(out, emulation.gemm(qa, qb))


@pytest.mark.parametrize("tokens,k,n", [(200, 256, 576), (96, 576, 256), (128, 300, 136)],
                         ids=["kv_a_proj", "kv_a_proj-input-576", "128-tokens"])
def test_fprop_dgrad_and_wgrad_of_an_fp8_linear_run_through_pytorchs_checks(model, tokens, k, n):
    """A Linear's three GEMMs (Fprop 1x128 x 128x128, Dgrad 1x128 x 128x128 over N, Wgrad over tokens)
    on the PyTorch backend equal the emulated Linear; Dgrad over N = 576 (4.5 blocks, DeepSeek's
    kv_a_proj) pads K to 8 chunks, so the 128x128 scale's rows lie 8 apart under both rules."""
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(tokens, k, generator=g), torch.randn(tokens, n, generator=g)
    w = torch.randn(n, k, generator=g) * 0.05
    results = {}
    for plan in (PYTORCH, EMULATED):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = _FP8Linear.apply(xi, wi, None, plan, "test", False, False, None)
        y.backward(dy)
        results[plan.backend] = (y.detach(), xi.grad, wi.grad)
    for got, want in zip(results["pytorch"], results["emulated"]):
        _close(got, want)
    fprop, dgrad, wgrad = model.calls
    assert (fprop.m, fprop.n, fprop.scaling) == (-(-tokens // 16) * 16, -(-n // 16) * 16, ("1x128", "128x128"))
    assert dgrad.scaling == ("1x128", "128x128") and (dgrad.k // 128) % 4 == 0 and dgrad.k >= n
    rowwise = tokens <= 128  # one K-chunk: PyTorch classifies the 1x128 pair as row-wise (the same product)
    assert wgrad.scaling == (("RowWise", "RowWise") if rowwise else ("1x128", "1x128")) and wgrad.k >= tokens


@pytest.mark.parametrize("m,n,k", [(0, 64, 256), (48, 0, 256), (48, 64, 0)], ids=["M=0", "N=0", "K=0"])
def test_empty_operands_never_reach_scaled_mm(model, m, n, k):
    """PyTorch checks scale layouts before its own M/N/K = 0 return, and an empty scale cannot have the
    strides it wants (the model rejects it, test above): the backend answers without the GEMM."""
    out = scaled_mm.gemm(quantize(torch.randn(m, k), (1, 128)), quantize(torch.randn(n, k), (128, 128)), torch.float32)
    assert out.shape == (m, n) and torch.equal(out, torch.zeros(m, n)) and model.calls == []


def test_an_fp8_linear_without_tokens_gets_empty_outputs_and_a_zero_weight_gradient(model):
    x = torch.zeros(0, 256, requires_grad=True)
    w = torch.randn(576, 256, requires_grad=True)
    y = _FP8Linear.apply(x, w, None, PYTORCH, "test", False, False, None)
    y.sum().backward()
    assert y.shape == (0, 576) and x.grad.shape == (0, 256) and torch.equal(w.grad, torch.zeros_like(w))
    assert model.calls == []


def test_an_fp8_expert_layer_with_an_empty_expert_runs_through_pytorchs_checks(megatron_single_process, monkeypatch):
    """dsv3-tiny's routed experts (SequentialMLP of FP8 Linears; hidden 128, expert FFN 64: K = 64 and
    one K-chunk) with one expert that received no tokens, on the PyTorch backend against the emulation."""
    from test_fp8_recipes import _fp8_model

    from megatron_dsv3.fp8.experts import FP8SequentialMLP
    from megatron_dsv3.fp8.linear import FP8LinearMixin

    blas = ScaledBlasModel(rule_for(torch.__version__))
    net, _ = _fp8_model(monkeypatch, ["--dsv3-experts", "sequential"])
    experts = next(m for m in net.modules() if isinstance(m, FP8SequentialMLP))
    linears = [m for m in experts.modules() if isinstance(m, FP8LinearMixin)]
    count = len(experts.local_experts)
    tokens_per_expert = torch.tensor([5 if e % 3 else 0 for e in range(count)])  # experts 0, 3, ... get none
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(int(tokens_per_expert.sum()), 128, generator=g)
    probs = torch.rand(hidden.shape[0], generator=g)
    results = {}
    for plan in (PYTORCH, EMULATED):
        for linear in linears:
            linear.fp8 = plan
        for p in experts.parameters():
            p.grad = None
        h = hidden.clone().requires_grad_()
        with monkeypatch.context() as m:
            m.setattr(torch, "_scaled_mm", blas)
            out, _ = experts(h, tokens_per_expert, probs)
            out.sum().backward()
        results[plan.backend] = (out.detach(), h.grad, *[p.grad.clone() for p in experts.parameters()])
    busy = int((tokens_per_expert > 0).sum())
    assert len(blas.calls) == 2 * 3 * busy  # fc1 and fc2, three GEMMs each, per expert with tokens
    for got, want in zip(results["pytorch"], results["emulated"]):
        _close(got, want)
    empty = experts.local_experts[0]
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in empty.parameters())
