"""What only a GPU can show: the grouped experts, the FP8 experts and DualPipe's stream set-up on CUDA.

Run by ``benchmarks/gpu_proof.py`` on the GPU test machine (with ``tests/test_fp8_gpu.py``); skipped,
saying why, without a GPU.  The CPU tests prove the same claims against CPU kernels; here the kernels
are CUDA's: CUTLASS's ``grouped_mm`` against cuBLAS's per-expert GEMMs, ``torch._scaled_mm`` against
the emulation on the same FP8 codes, real CUDA streams for Megatron's communication stream.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (benchmarks/gpu_proof.py runs it)")


@pytest.fixture(scope="module")
def gpu_process():
    """One NCCL rank with Megatron's parallel state (TP = PP = EP = 1), the plugin active."""
    from megatron_dsv3.runtime.activation import activate
    from megatron_dsv3.testing.distributed import join_one_rank_world

    activate(source="gpu tests")
    torch.cuda.set_device(0)
    join_one_rank_world("nccl")
    yield


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _experts_of(experts: str, extra=()):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_dsv3.parallel import ParallelLayout
    from megatron_dsv3.testing.parallel import build_chunks

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    _, _, (model,) = build_chunks("dsv3-tiny", ParallelLayout(), ddp=False, cpu=False,
                                  extra_args=("--dsv3-experts", experts, *extra))
    while hasattr(model, "module"):
        model = model.module
    return model.decoder.layers[1].mlp.experts


def _run(experts, counts, x, probs, dy) -> list[torch.Tensor]:
    x, probs = x.clone().requires_grad_(), probs.clone().requires_grad_()
    for p in experts.parameters():
        p.grad = None
    out, _ = experts(x, counts, probs)
    out.backward(dy)
    grads = [p.grad for p in experts.parameters()]
    if len(grads) > 2:  # SequentialMLP: per expert (fc1, fc2) -> stacked like the grouped experts
        grads = [torch.stack(grads[0::2]), torch.stack(grads[1::2])]
    return [out.detach(), x.grad, probs.grad, *grads]


def _inputs(dtype, num_experts=16, hidden=128):
    counts = torch.tensor([0 if e % 4 == 0 else 3 + 37 * e for e in range(num_experts)])  # empty and odd-sized
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(int(counts.sum()), hidden, device="cuda", generator=g).to(dtype)
    probs = torch.rand(x.shape[0], device="cuda", generator=g)
    return counts, x, probs, torch.randn(x.shape, device="cuda", generator=g).to(dtype)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_grouped_experts_on_the_gpu_equal_sequential_experts(gpu_process, precision):
    """CUTLASS's grouped GEMM against cuBLAS's per-expert GEMMs, empty experts included: equal to
    bf16 rounding (fp32: to fp32 rounding), and experts without tokens get exactly zero gradients."""
    extra = ("--bf16",) if precision == "bf16" else ()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    counts, x, probs, dy = _inputs(dtype)
    grouped = _run(_experts_of("grouped", extra), counts, x, probs, dy)
    sequential = _run(_experts_of("sequential", extra), counts, x, probs, dy)
    bound = 1e-2 if precision == "bf16" else 1e-5
    for name, a, b in zip(("out", "dx", "dprobs", "dw1", "dw2"), grouped, sequential):
        assert _rel(a, b) < bound, (name, _rel(a, b))
    empty = counts == 0
    for dw in grouped[3:]:
        assert torch.count_nonzero(dw[empty.cuda()]) == 0


def test_fp8_grouped_experts_on_the_gpu_match_the_emulation(gpu_process):
    """The FP8 grouped experts on ``torch._scaled_mm`` and on the emulation multiply the same codes:
    outputs and gradients agree to bf16 output rounding; empty experts run no GEMM."""
    from megatron_dsv3.fp8.plan import FP8Plan
    from megatron_dsv3.fp8.recipes import named_recipe

    experts = _experts_of("grouped", ("--bf16", "--dsv3-fp8", "deepseek", "--dsv3-fp8-moments", "fp32",
                                      "--dsv3-fp8-backend", "pytorch"))
    counts, x, probs, dy = _inputs(torch.bfloat16)
    results = {}
    for backend in ("pytorch", "emulated"):
        for linear in (experts.linear_fc1, experts.linear_fc2):
            linear.fp8 = FP8Plan(recipe=named_recipe("deepseek"), backend=backend)
        results[backend] = _run(experts, counts, x, probs, dy)
    for name, a, b in zip(("out", "dx", "dprobs", "dw1", "dw2"), results["pytorch"], results["emulated"]):
        assert _rel(a, b) < 1e-2, (name, _rel(a, b))


@pytest.mark.parametrize("m", [0, 1, 129])
def test_scaled_mm_with_empty_and_odd_sized_operands_equals_the_emulation(m):
    from megatron_dsv3.fp8 import emulation, scaled_mm
    from megatron_dsv3.fp8.quantize import quantize

    usable, reason = scaled_mm.scaled_mm_status()
    if not usable:
        pytest.skip(f"block-wise torch._scaled_mm unavailable: {reason}")
    g = torch.Generator(device="cuda").manual_seed(m)
    a = torch.randn(m, 300, device="cuda", generator=g, dtype=torch.bfloat16)
    b = torch.randn(136, 300, device="cuda", generator=g, dtype=torch.bfloat16)
    for blocks in (((1, 128), (128, 128)), ((1, 128), (1, 128))):
        qa, qb = quantize(a, blocks[0]), quantize(b, blocks[1])
        out = scaled_mm.gemm(qa, qb, torch.bfloat16)
        assert out.shape == (m, 136)
        if m:
            assert _rel(out, emulation.gemm(qa, qb, torch.float32)) < 4e-3


def test_the_overlapped_step_on_the_gpu_runs_dispatch_and_combine_on_megatrons_comm_stream(gpu_process, monkeypatch):
    from test_dualpipe_equivalence import overlapped_step_uses_megatrons_comm_stream

    overlapped_step_uses_megatrons_comm_stream(monkeypatch, cpu=False)


def test_the_compiled_quantizer_on_the_gpu_gives_the_eager_codes_bit_for_bit(monkeypatch):
    """Triton's kernel (its float32 division is approximate: the fused form divides in float64)
    against the eager quantizer on the CPU, every role and layout of DeepSeek's recipe."""
    from test_fp8_fused_quantize import _hard_tensor

    monkeypatch.setattr(torch._dynamo.config, "disable", False)  # the tests run with TorchDynamo off

    from megatron_dsv3.fp8.fused_quantize import fused_quantize_for
    from megatron_dsv3.fp8.quantize import quantize_for
    from megatron_dsv3.fp8.recipes import named_recipe

    recipe = named_recipe("deepseek")
    x = _hard_tensor(300, 576)
    for role in ("activation", "weight", "grad"):
        for along in ("cols", "rows"):
            got = fused_quantize_for(x.cuda(), recipe, role, along=along)
            want = quantize_for(x, recipe, role, along=along)
            assert torch.equal(got.data.cpu().view(torch.uint8), want.data.view(torch.uint8)), (role, along)
            assert torch.equal(got.scale_inv.cpu(), want.scale_inv), (role, along)
