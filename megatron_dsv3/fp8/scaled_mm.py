"""The PyTorch GPU backend's GEMM: ``torch._scaled_mm`` with 1x128 and 128x128 block scales.

Facts it relies on (FACTS.md, "FP8 block-wise, details that bite", and PyTorch's
``aten/src/ATen/native/cuda/ScaledBlas.cpp``):

* block-wise scaling needs compute capability 9.0 (Hopper) and cuBLASLt >= 12.9; other GPUs and the
  CPU raise;
* allowed operand pairs: 1x128 by 128x128, 128x128 by 1x128, 1x128 by 1x128 (never 2-D by 2-D);
* ``mat1`` row-major (M, K), ``mat2`` column-major (K, N); a 1x128 scale of ``mat1`` is
  (M, K/128) stored outer-dim-major (column-major), a 128x128 scale row-major; for ``mat2`` the
  same rules apply to its transpose; K a multiple of 16;
* ``out_dtype`` is always given; ``use_fast_accum=False`` keeps cuBLAS's split accumulator (the
  FP32 promotion of section 3.3.2).

Operands come from :func:`megatron_dsv3.fp8.quantize.quantize`, the same quantizer the emulation
uses, so both backends multiply identical FP8 codes with identical scales.  Rows and K are
zero-padded to multiples of 16 where needed (zeros add nothing; the scale grid is unchanged).
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


def _pad_rows(t: torch.Tensor, rows: int, value: float = 0.0) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.nn.functional.pad(t, (0, 0, 0, rows - t.shape[0]), value=value)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _codes(q: BlockQuantized, rows: int, cols: int) -> torch.Tensor:
    data = q.data
    if data.shape != (rows, cols):  # pad through a uint8 view: F.pad has no float8 kernels
        raw = torch.zeros(rows, cols, dtype=torch.uint8, device=data.device)
        raw[: data.shape[0], : data.shape[1]] = data.view(torch.uint8)
        return raw.view(data.dtype)
    return data.contiguous()


# PyTorch versions differ on the row stride of a 128x128 scale whose K-chunk count is not a multiple
# of 4: some want it padded to 16 bytes, some exact.  The first GEMM that needs it finds out.
_PAD_128x128_ROWS = [True]


def _scale(q: BlockQuantized, rows: int, operand: str) -> torch.Tensor:
    """``q``'s scales in the layout ScaledBlas.cpp checks (``operand``: "a" for mat1, "b" for mat2^T)."""
    s = q.scale_inv.to(torch.float32)
    if q.block[0] == 1:  # 1x128: one scale per row and K-chunk, pad rows with 1
        s = _pad_rows(s, rows, 1.0)
        # mat1: (M, K/128) column-major; mat2: its transpose (K/128, N) row-major.
        return s.t().contiguous().t() if operand == "a" else s.t().contiguous()
    chunks = s.shape[1]
    if chunks % 4 and _PAD_128x128_ROWS[0]:
        padded = torch.ones(s.shape[0], _round_up(chunks, 4), dtype=torch.float32, device=s.device)
        padded[:, :chunks] = s
        s = padded[:, :chunks]
    else:
        s = s.contiguous()
    return s if operand == "a" else s.t()


def gemm(a: BlockQuantized, b: BlockQuantized, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``a @ b^T`` on the GPU's FP8 tensor cores; ``a``: (M, K), ``b``: (N, K), blocks along K of 128."""
    (m, k), (n, _) = a.shape, b.shape
    if a.block[1] != 128 or b.block[1] != 128:
        raise ValueError(f"torch._scaled_mm block-wise scaling takes 128-element blocks along K, got {a.block}"
                         f" and {b.block}")
    if a.block[0] != 1 and b.block[0] != 1:
        raise ValueError("torch._scaled_mm has no 128x128 by 128x128 block-wise GEMM")
    mp, np_, kp = _round_up(m, _ALIGN), _round_up(n, _ALIGN), _round_up(k, _ALIGN)
    mat1, mat2 = _codes(a, mp, kp), _codes(b, np_, kp).t()

    def run():
        return torch._scaled_mm(mat1, mat2, scale_a=_scale(a, mp, "a"), scale_b=_scale(b, np_, "b"),
                                out_dtype=out_dtype, use_fast_accum=False)

    try:
        out = run()
    except RuntimeError as err:
        two_d_odd = any(q.block[0] > 1 and q.scale_inv.shape[1] % 4 for q in (a, b))
        if not (two_d_odd and _PAD_128x128_ROWS[0] and "Invalid scaling configuration" in str(err)):
            raise
        _PAD_128x128_ROWS[0] = False  # this PyTorch wants the exact row stride
        out = run()
    return out[:m, :n] if (mp, np_) != (m, n) else out
