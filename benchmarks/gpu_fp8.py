"""Block-wise FP8 GEMMs on one H200 (PyTorch backend, ``torch._scaled_mm``) against BF16, and the quantizer.

For one H200 whenever a session has one (under 8 minutes; the machine has torch and no
megatron-core: this script imports only ``megatron_dsv3.fp8``'s recipes, quantizer and GEMMs, so
carrying the repository is enough).  It

1. checks the PyTorch backend against the emulation on the same inputs: the quantizer gives
   identical FP8 codes and scales on the GPU and on the CPU, and ``torch._scaled_mm``'s output
   equals the emulated GEMM's within BF16 output rounding;
2. times DeepSeek-V3's Linear shapes (hidden 7168; dense FFN 18432; expert 2048; the MLA
   projections: arXiv 2412.19437v2 section 4.2, ``config_671B.json``): TFLOP/s of the BF16 GEMM,
   of the FP8 GEMM on pre-quantised operands, and of FP8 including the quantisation of the
   activation (what a Linear pays), with the speed-up over BF16 (target: FP8 >= 1.5x BF16 on the
   large shapes; DeepGEMM reaches about 1,550 TFLOP/s on H800, its README);
3. measures the quantizer's bandwidth (bytes read + written per second), eager and compiled
   (``megatron_dsv3.fp8.fused_quantize``, one kernel), against the device's copy bandwidth.

    python benchmarks/gpu_fp8.py [--tokens 4096] [--repeats 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

# (name, K, N): y = x W^T with x (tokens, K), W (N, K).  DeepSeek-V3: hidden 7168, 128 heads,
# q_lora 1536, kv_lora 512, qk 128 + 64 rope, v 128, dense FFN 18432, expert FFN 2048.
SHAPES = [
    ("dense MLP fc1 (gate+up)", 7168, 2 * 18432),
    ("dense MLP fc2", 18432, 7168),
    ("expert fc1 (gate+up)", 7168, 2 * 2048),
    ("expert fc2", 2048, 7168),
    ("MLA q down-projection", 7168, 1536),
    ("MLA q up-projection", 1536, 128 * (128 + 64)),
    ("MLA kv down-projection", 7168, 512 + 64),
    ("MLA kv up-projection", 512, 128 * (128 + 128)),
    ("MLA output projection", 128 * 128, 7168),
]
LARGE = {"dense MLP fc1 (gate+up)", "dense MLP fc2", "MLA q up-projection", "MLA kv up-projection",
         "MLA output projection"}


def _timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (CUDA events), after warm-up."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def check_against_emulation() -> list[dict]:
    import torch

    from megatron_dsv3.fp8 import emulation, scaled_mm
    from megatron_dsv3.fp8.quantize import quantize

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for (m, k, n), blocks in [((1000, 7168, 1536), ((1, 128), (128, 128))), ((512, 2048, 7168), ((1, 128), (128, 128))),
                              ((7168, 4096, 2048), ((1, 128), (1, 128)))]:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
        b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        qa, qb = quantize(a, blocks[0]), quantize(b, blocks[1])
        on_cpu = quantize(a.cpu(), blocks[0])
        same_codes = bool(torch.equal(qa.data.cpu().view(torch.uint8), on_cpu.data.view(torch.uint8))
                          and torch.equal(qa.scale_inv.cpu(), on_cpu.scale_inv))
        reference = emulation.gemm(qa, qb, torch.float32)
        out = scaled_mm.gemm(qa, qb, torch.bfloat16).float()
        rel = float((out - reference).norm() / reference.norm())
        rows.append({"m": m, "k": k, "n": n, "blocks": f"{blocks[0][0]}x{blocks[0][1]} by {blocks[1][0]}x{blocks[1][1]}",
                     "identical_codes_gpu_cpu": same_codes, "rel_err_vs_emulation": rel, "ok": same_codes and rel < 4e-3})
    return rows


def time_shapes(tokens: int, repeats: int) -> list[dict]:
    import torch

    from megatron_dsv3.fp8 import scaled_mm
    from megatron_dsv3.fp8.fused_quantize import fused_quantize
    from megatron_dsv3.fp8.quantize import quantize

    # (name, M, K, N, blocks of the second operand): Fprop rows, plus an expert at a realistic
    # per-expert token count and a Wgrad GEMM (dW = dy^T x, both operands tiled along tokens).
    cases = [(name, tokens, k, n, (128, 128)) for name, k, n in SHAPES]
    cases += [("expert fc1, 512 tokens", 512, 7168, 2 * 2048, (128, 128)),
              ("dense fc1 Wgrad (1x128 by 1x128)", 2 * 18432, tokens, 7168, (1, 128))]
    rows = []
    for name, m, k, n, b_block in cases:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        qx, qw = quantize(x, (1, 128)), quantize(w, b_block)
        flops = 2 * m * n * k
        t_bf16 = _timed(lambda: x @ w.t(), repeats)
        t_fp8 = _timed(lambda: scaled_mm.gemm(qx, qw, torch.bfloat16), repeats)
        # What a Linear pays on a GPU: the compiled quantizer (same codes as the eager one) then the GEMM.
        t_fp8_q = _timed(lambda: scaled_mm.gemm(fused_quantize(x, (1, 128)), qw, torch.bfloat16), repeats)
        rows.append({"shape": name, "m": m, "k": k, "n": n, "bf16_tflops": flops / t_bf16 / 1e12,
                     "fp8_tflops": flops / t_fp8 / 1e12, "fp8_with_quantize_tflops": flops / t_fp8_q / 1e12,
                     "speedup": t_bf16 / t_fp8, "speedup_with_quantize": t_bf16 / t_fp8_q, "large": name in LARGE})
        del x, w, qx, qw
        torch.cuda.empty_cache()
    return rows


def quantizer_bandwidth(repeats: int) -> list[dict]:
    import torch

    from megatron_dsv3.fp8.fused_quantize import fused_quantize
    from megatron_dsv3.fp8.quantize import quantize

    x = torch.randn(16384, 7168, device="cuda", dtype=torch.bfloat16)
    n = x.numel()
    t_copy = _timed(lambda: x.clone(), repeats)
    copy = 2 * 2 * n / t_copy  # read + write, bytes per second
    rows = [{"what": "device copy (bf16 clone)", "gb_per_s": copy / 1e9, "of_copy": 1.0}]
    for label, block in (("quantize 1x128 (activations)", (1, 128)), ("quantize 128x1 (Wgrad operand)", (128, 1)),
                         ("quantize 128x128 (weights)", (128, 128))):
        moved = 2 * n + n + 4 * n // (block[0] * block[1])  # read bf16, write fp8 codes and fp32 scales
        for kind, fn in (("eager", lambda: quantize(x, block)),
                         ("compiled", lambda: fused_quantize(x, block, transpose=block[0] > 1 and block[1] == 1))):
            t = _timed(fn, repeats)
            rows.append({"what": f"{label}, {kind}", "gb_per_s": moved / t / 1e9, "of_copy": moved / t / copy})
    return rows


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--tokens", type=int, default=4096, help="rows of the activation (one 4K sequence)")
    cli.add_argument("--repeats", type=int, default=20)
    cli.add_argument("--json", default=None)
    opts = cli.parse_args()

    import torch

    from megatron_dsv3.fp8.scaled_mm import scaled_mm_status

    usable, reason = scaled_mm_status()
    if not usable:
        print(f"block-wise torch._scaled_mm cannot run here: {reason}")
        sys.exit(2)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}\n")
    checks = check_against_emulation()
    print("PyTorch backend vs emulation (same inputs, one quantizer):")
    for c in checks:
        print(f"  {c['m']}x{c['k']} @ {c['n']}x{c['k']}^T, {c['blocks']}: identical FP8 codes on GPU and CPU:"
              f" {c['identical_codes_gpu_cpu']}, relative difference {c['rel_err_vs_emulation']:.2e}"
              f" -> {'OK' if c['ok'] else 'FAILED'}")
    rows = time_shapes(opts.tokens, opts.repeats)
    print(f"\n{'shape':34} {'M':>6} {'K':>6} {'N':>6} {'BF16':>7} {'FP8':>7} {'FP8+q':>7} {'x':>5} {'x+q':>5}  TFLOP/s")
    for r in rows:
        print(f"{r['shape']:34} {r['m']:6d} {r['k']:6d} {r['n']:6d} {r['bf16_tflops']:7.0f} {r['fp8_tflops']:7.0f}"
              f" {r['fp8_with_quantize_tflops']:7.0f} {r['speedup']:5.2f} {r['speedup_with_quantize']:5.2f}")
    large = [r["speedup"] for r in rows if r["large"]]
    print(f"\nlarge shapes: FP8 / BF16 = {min(large):.2f} .. {max(large):.2f} (target >= 1.5)")
    bandwidth = quantizer_bandwidth(opts.repeats)
    print("\nquantizer bandwidth (bytes read + written):")
    for b in bandwidth:
        print(f"  {b['what']:44} {b['gb_per_s']:8.0f} GB/s  {b['of_copy'] * 100:5.1f}% of copy")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "checks": checks, "gemms": rows,
                       "quantizer": bandwidth}, f, indent=1)
    sys.exit(0 if all(c["ok"] for c in checks) else 1)


if __name__ == "__main__":
    main()
