"""The PyTorch GPU backend's GEMM: ``torch._scaled_mm`` with 1x128 and 128x128 block scales.

Facts it relies on (PyTorch PR #158037, which added block-wise scaling to ``torch._scaled_mm``; PyTorch's
``aten/src/ATen/native/cuda/ScaledBlas.cpp``, the v1 ``_scaled_mm_out_cuda`` path; the cuBLAS
documentation, "128-element 1D and 128x128 2D block scaling for FP8 data types"):

* block-wise scaling needs compute capability 9.0 (Hopper) and cuBLASLt >= 12.9; other GPUs and the
  CPU raise;
* allowed operand pairs: 1x128 by 128x128, 128x128 by 1x128, 1x128 by 1x128 (never 2-D by 2-D);
* ``mat1`` row-major (M, K), ``mat2`` column-major (K, N); K and N multiples of 16;
* a 1x128 scale of ``mat1`` is (M, K/128) with strides (1, M) (outer-dim-major); a 128x128 scale
  (M/128, K/128) row-major; ``mat2``'s scales follow the same rules for its transpose;
* the row stride of a 128x128 scale: PyTorch <= 2.9 wants ``round_up(K/128, 4)``, PyTorch >= 2.10
  (PR #164953) exactly ``K/128``, and cuBLAS reads it with a stride that is a multiple of 4 whatever
  the tensor says.  Where a 128x128 operand is involved and K/128 is not a multiple of 4 (DeepSeek's
  ``kv_a_proj`` Dgrad: K = 576, 5 chunks), K is zero-padded to a multiple of 4 chunks, so the one
  layout both PyTorch rules accept is also the one cuBLAS reads (zeros add nothing);
* PyTorch checks the scale layouts before its own early return for M, N or K = 0, and an empty scale
  cannot have the strides it wants, so empty operands (an expert that received no tokens) never reach
  it: the result is returned directly (zeros when K = 0);
* ``out_dtype`` is always given; ``use_fast_accum=False`` keeps cuBLAS's split accumulator (the
  FP32 promotion of section 3.3.2).

Operands come from :func:`megatron_dsv3.fp8.quantize.quantize`, the same quantizer the emulation
uses, so both backends multiply identical FP8 codes with identical scales.  Rows and K are
zero-padded where needed (zeros add nothing; padded scales are 1).  ``tests/test_fp8_scaled_mm.py``
runs every call through a CPU model of these checks (:mod:`megatron_dsv3.testing.scaled_blas`).
"""

from __future__ import annotations

import functools

import torch

from megatron_dsv3.fp8.quantize import BlockQuantized

_ALIGN = 16


@functools.cache
def scaled_mm_status() -> tuple[bool, str]:
    """Whether block-wise ``torch._scaled_mm`` can run here, and if not, why."""
    if not torch.cuda.is_available():
        return False, "no GPU is visible (the PyTorch FP8 backend needs an SM90 GPU)"
    capability = torch.cuda.get_device_capability()
    if capability != (9, 0):
        return False, (f"compute capability {capability[0]}.{capability[1]}: torch._scaled_mm block-wise"
                       " scaling runs only on SM90 (Hopper)")
    version = tuple(int(p) for p in (torch.version.cuda or "0.0").split(".")[:2])
    if version < (12, 9):
        return False, f"CUDA {torch.version.cuda}: block-wise scaled_mm needs cuBLASLt >= 12.9"
    if not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no torch._scaled_mm"
    return True, ""


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _codes(q: BlockQuantized, rows: int, cols: int) -> torch.Tensor:
    """``q``'s codes zero-padded to (rows, cols), row-major."""
    data = q.data
    if data.shape != (rows, cols):  # pad through a uint8 view: F.pad has no float8 kernels
        raw = torch.zeros(rows, cols, dtype=torch.uint8, device=data.device)
        raw[: data.shape[0], : data.shape[1]] = data.view(torch.uint8)
        return raw.view(data.dtype)
    return data.contiguous()


def _scale(q: BlockQuantized, rows: int, chunks: int, operand: str) -> torch.Tensor:
    """``q``'s scales for ``rows`` padded rows and ``chunks`` K-chunks, padded with 1, in the layout
    ScaledBlas.cpp checks (``operand``: "a" for mat1, "b" for mat2, whose rules apply to mat2^T)."""
    s = q.scale_inv.to(torch.float32)
    block_rows = rows if q.block[0] == 1 else _round_up(rows, q.block[0]) // q.block[0]
    if s.shape != (block_rows, chunks):
        padded = torch.ones(block_rows, chunks, dtype=torch.float32, device=s.device)
        padded[: s.shape[0], : s.shape[1]] = s
        s = padded
    if q.block[0] == 1:  # (rows, chunks) outer-dim-major: strides (1, rows)
        return s.t().contiguous().t() if operand == "a" else s.t().contiguous()
    s = s.contiguous()  # (row blocks, chunks) row-major; chunks is a multiple of 4 here
    return s if operand == "a" else s.t()


def gemm(a: BlockQuantized, b: BlockQuantized, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``a @ b^T`` on the GPU's FP8 tensor cores; ``a``: (M, K), ``b``: (N, K), blocks along K of 128."""
    (m, k), (n, k_b) = a.shape, b.shape
    if k != k_b:
        raise ValueError(f"operands must share K: a {tuple(a.shape)}, b {tuple(b.shape)}")
    if a.block[1] != 128 or b.block[1] != 128:
        raise ValueError(f"torch._scaled_mm block-wise scaling takes 128-element blocks along K, got {a.block}"
                         f" and {b.block}")
    if a.block[0] != 1 and b.block[0] != 1:
        raise ValueError("torch._scaled_mm has no 128x128 by 128x128 block-wise GEMM")
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(m, n, dtype=out_dtype, device=a.data.device)
    mp, np_, kp = _round_up(m, _ALIGN), _round_up(n, _ALIGN), _round_up(k, _ALIGN)
    chunks = _round_up(k, 128) // 128
    if chunks % 4 and any(q.block[0] > 1 for q in (a, b)):
        chunks = _round_up(chunks, 4)  # the 128x128 scale's row stride cuBLAS reads (module docstring)
        kp = chunks * 128
    out = torch._scaled_mm(_codes(a, mp, kp), _codes(b, np_, kp).t(), scale_a=_scale(a, mp, chunks, "a"),
                           scale_b=_scale(b, np_, chunks, "b"), out_dtype=out_dtype, use_fast_accum=False)
    return out[:m, :n] if (mp, np_) != (m, n) else out
