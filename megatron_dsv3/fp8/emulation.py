"""The FP8 reference GEMM: block-scaled operands, dequantised chunk by chunk, multiplied in fp32.

``gemm(a, b)`` computes ``a @ b^T`` for two :class:`~megatron_dsv3.fp8.quantize.BlockQuantized`
operands whose blocks along K have the same length ``N_C``.  It follows DeepSeek-V3's accumulation
(section 3.3.2, figure 7b): for every K-chunk of ``N_C`` elements the FP8 codes are multiplied and
summed (the tensor cores' partial result), then the partial sum is multiplied by the two blocks'
scales and added to an FP32 accumulator (the promotion to CUDA cores every ``N_C = 128``
elements).  FP8 codes are exact in fp32 and so are their products; within a chunk the sum is kept
in fp32, which is more precise than Hopper's tensor cores (about 14 bits, section 3.3.2), so the
emulation bounds what the hardware can do rather than reproducing its rounding.

It runs on any device and is the reference for the tests and for ``benchmarks/fp8_parity.py``.
"""

from __future__ import annotations

import torch

from megatron_dsv3.fp8.quantize import BlockQuantized


def gemm(a: BlockQuantized, b: BlockQuantized, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a @ b^T`` with the 128-element promotion emulated; ``a``: (M, K), ``b``: (N, K)."""
    (m, k), (n, k_b) = a.shape, b.shape
    chunk = a.block[1]
    if k != k_b or b.block[1] != chunk:
        raise ValueError(f"operands must share K and its block length: a {tuple(a.shape)} in {a.block} blocks,"
                         f" b {tuple(b.shape)} in {b.block} blocks")
    scale_a, scale_b = a.scales_per_row(), b.scales_per_row()  # (M, chunks), (N, chunks)
    codes_a, codes_b = a.data.to(torch.float32), b.data.to(torch.float32)
    out = torch.zeros(m, n, dtype=torch.float32, device=a.data.device)
    for c, start in enumerate(range(0, k, chunk)):
        part = codes_a[:, start : start + chunk] @ codes_b[:, start : start + chunk].t()
        out += part * (scale_a[:, c, None] * scale_b[None, :, c])
    return out.to(out_dtype)
