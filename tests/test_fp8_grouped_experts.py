"""Grouped FP8 experts: the sequential FP8 experts' codes and results, with fewer quantisation passes.

The reference is Megatron's ``SequentialMLP`` of our FP8 Linears on the emulation backend (each
expert quantises its own tokens, each segment its own Wgrad tiles).  The grouped experts quantise
all experts' tokens, weights and Wgrad operands in one pass each: the codes must be the ones each
expert's own quantisation gives, Fprop and Dgrad then equal bit for bit, and Wgrad (one GEMM over an
expert's padded segments instead of a sum of per-segment GEMMs) to fp32 summation order.  On the
PyTorch backend every ``torch._scaled_mm`` call goes through the CPU model of PyTorch's checks.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dsv3.fp8.plan import FP8Plan
from megatron_dsv3.fp8.recipes import named_recipe
from megatron_dsv3.testing.scaled_blas import ScaledBlasModel

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)

DEEPSEEK = named_recipe("deepseek")
EMULATED, PYTORCH = FP8Plan(recipe=DEEPSEEK, backend="emulated"), FP8Plan(recipe=DEEPSEEK, backend="pytorch")


@pytest.fixture(scope="module")
def experts(megatron_single_process):
    """dsv3-tiny's FP8 routed experts (16 experts, hidden 128, width 64), grouped and sequential, same seed."""
    import pytest as _pytest
    from test_fp8_recipes import _fp8_model

    built = {}
    with _pytest.MonkeyPatch.context() as monkeypatch:
        for kind in ("grouped", "sequential"):
            torch.manual_seed(0)
            from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(0)
            model, _ = _fp8_model(monkeypatch, ["--dsv3-experts", kind, "--dsv3-fp8-backend", "emulated"])
            built[kind] = model.decoder.layers[1].mlp.experts
    return built


def _inputs(seed: int = 2):
    counts = torch.tensor([0 if e % 4 == 0 else 9 * e + 1 for e in range(16)])
    counts[1] = 200  # more than one 128-token tile
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(int(counts.sum()), 128, generator=g)
    return counts, x, torch.rand(x.shape[0], generator=g), torch.randn(x.shape, generator=g)


def _sources(counts):
    """Two expert-parallel sources per expert (what the dispatcher records under EP = 2)."""
    return [[int(c) // 3, int(c) - int(c) // 3] for c in counts]


def _run(module, counts, x, probs, dy, sources=None):
    from megatron_dsv3.fp8.segments import TOKEN_SOURCES

    x, probs = x.clone().requires_grad_(), probs.clone().requires_grad_()
    for p in module.parameters():
        p.grad = None
    TOKEN_SOURCES._pending = sources
    out, _ = module(x, counts, probs)
    out.backward(dy)
    grads = [p.grad for p in module.parameters()]
    if len(grads) > 2:  # SequentialMLP: stack per projection
        grads = [torch.stack(grads[0::2]), torch.stack(grads[1::2])]
    return [out.detach(), x.grad, probs.grad, *grads]


@pytest.mark.parametrize("segments", [False, True], ids=["one-source", "two-sources"])
def test_grouped_fp8_experts_equal_the_sequential_fp8_experts(experts, segments):
    """Fprop and Dgrad bit for bit; Wgrad to fp32 rounding; empty experts get zero weight gradients."""
    grouped, sequential = experts["grouped"], experts["sequential"]
    with torch.no_grad():
        for fc in ("linear_fc1", "linear_fc2"):
            getattr(grouped, fc).weight.copy_(torch.stack([getattr(e, fc).weight for e in sequential.local_experts]))
    counts, x, probs, dy = _inputs()
    sources = _sources(counts) if segments else None
    got = _run(grouped, counts, x, probs, dy, sources)
    want = _run(sequential, counts, x, probs, dy, sources)
    for name, a, b in zip(("out", "dx", "dprobs"), got[:3], want[:3]):
        assert torch.equal(a, b), name
    for a, b in zip(got[3:], want[3:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))
        assert torch.count_nonzero(a[counts == 0]) == 0


def test_one_pass_quantisation_gives_each_experts_own_codes():
    """Tokens of all experts at once (1x128 tiles), all weights at once (each in its own 128x128
    blocks, 200-row experts: partial blocks), Wgrad operands with tiles restarting at every segment."""
    from megatron_dsv3.fp8.experts import quantize_along_tokens, quantize_stacked_weights

    g = torch.Generator().manual_seed(5)
    weights = torch.randn(3, 200, 256, generator=g)
    for e, q in enumerate(quantize_stacked_weights(EMULATED, weights, "w")):
        want = EMULATED.quantize(weights[e], "weight")
        assert torch.equal(q.data.view(torch.uint8), want.data.view(torch.uint8)) and torch.equal(q.scale_inv, want.scale_inv)
    segments = [[5, 130], [0], [77]]
    t = torch.randn(212, 64, generator=g)
    q, bounds = quantize_along_tokens(EMULATED, t, "grad", segments, "t")
    start = 0
    for e, (lo, hi) in enumerate(bounds):
        col = lo
        for size in segments[e]:
            want = EMULATED.quantize(t[start:start + size], "grad", along="rows")
            assert torch.equal(q.data[:, col:col + size].view(torch.uint8), want.data.view(torch.uint8))
            assert torch.equal(q.scale_inv[:, col // 128:(col + size + 127) // 128], want.scale_inv)
            start, col = start + size, col + -(-size // 128) * 128
        assert col == hi


@pytest.mark.parametrize("rule", ["exact"])  # PyTorch >= 2.10 (the GPU machine: 2.11); test_fp8_scaled_mm has both
def test_every_scaled_mm_call_of_the_grouped_fp8_experts_passes_pytorchs_checks(experts, monkeypatch, rule):
    """The PyTorch backend through the CPU model of ``ScaledBlas.cpp`` against the emulation: three
    GEMMs per projection per expert with tokens, none for the empty ones."""
    grouped = experts["grouped"]
    counts, x, probs, dy = _inputs(seed=3)
    results = {}
    blas = ScaledBlasModel(rule)
    for plan in (PYTORCH, EMULATED):
        for linear in (grouped.linear_fc1, grouped.linear_fc2):
            linear.fp8 = plan
        with monkeypatch.context() as m:
            m.setattr(torch, "_scaled_mm", blas)
            results[plan.backend] = _run(grouped, counts, x, probs, dy, _sources(counts))
    for linear in (grouped.linear_fc1, grouped.linear_fc2):
        linear.fp8 = EMULATED
    assert len(blas.calls) == 2 * 3 * int((counts > 0).sum())
    for a, b in zip(results["pytorch"], results["emulated"]):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_the_grouped_fp8_weight_gradient_waits_in_the_zero_bubble_queue(experts):
    from megatron_dsv3.model.wgrad import WGRAD

    grouped = experts["grouped"]
    counts, x, probs, dy = _inputs(seed=4)
    want = _run(grouped, counts, x, probs, dy)[3:]
    for p in grouped.parameters():
        p.grad = None
    out, _ = grouped(x, counts, probs)
    with WGRAD.defer():
        out.backward(dy)
    assert all(p.grad is None for p in grouped.parameters())
    WGRAD.pop()
    assert all(torch.equal(p.grad, w) for p, w in zip(grouped.parameters(), want))
