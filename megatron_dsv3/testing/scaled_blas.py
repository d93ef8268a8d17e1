"""A CPU model of block-wise ``torch._scaled_mm`` on an SM90 GPU: the checks PyTorch makes, and the
product cuBLAS computes from the scale memory it reads.

No GPU runs the tests, so ``tests/test_fp8_scaled_mm.py`` installs :class:`ScaledBlasModel` in place of
``torch._scaled_mm`` and sends every call of the PyTorch FP8 backend (:mod:`megatron_dsv3.fp8.scaled_mm`)
through it.  Written from reading (not copying) PyTorch's v1 path ``_scaled_mm_out_cuda`` in
``aten/src/ATen/native/cuda/ScaledBlas.cpp`` (main, 2026; the same code sat in ``Blas.cpp`` before
PR #166314 moved it) and the cuBLAS documentation ("128-element 1D and 128x128 2D block scaling for
FP8 data types", "Scaling factors layouts"):

1. ``mat1`` and ``mat2`` are matrices and ``mat1.size(1) == mat2.size(0)``.
2. The scaling pair is the first of (TensorWise, TensorWise), (RowWise, RowWise), (128x128, 1x128),
   (1x128, 128x128), (1x128, 1x128) whose rules ``mat1`` with ``scale_a`` and ``mat2^T`` with
   ``scale_b^T`` both meet, else "Invalid scaling configuration".  For an operand ``t`` of shape
   (rows, K) and L = ceil(K / 128):

   * TensorWise: an fp32 scale with one element;
   * RowWise: an fp32 (rows, 1) contiguous scale;
   * 1x128: fp32, (rows, L), strides (1, rows);
   * 128x128: fp32, (ceil(rows / 128), L), strides (S, 1), where S is L from PyTorch 2.10 on
     (rule ``exact``, PR #164953) and round_up(L, 4) before (rule ``padded``, PyTorch 2.9);

   a stride is not checked where its size is <= 1 (``check_size_stride``).
3. ``mat1.size(1)`` is a multiple of 16, and both sizes of ``mat2``.
4. Only now, M, N or K = 0 returns early (zeros when K = 0): an empty operand must still pass 2.
5. cuBLASLt on SM90 multiplies a row-major ``mat1`` by a column-major ``mat2`` only.

cuBLAS then reads the scales from their data pointers in its own layout, whatever the strides say:
1x128 scales M-major (column stride M), 128x128 scales K-major with a column stride of
round_up(L, 4).  The model computes the product from what that reading finds (dequantise, multiply
in fp32), so a layout PyTorch accepts but cuBLAS reads differently gives a wrong product here too,
and a reading past the end of a scale tensor is an :class:`OutOfBoundsScaleRead`.
Not modelled: bias, FP8 outputs, ``scale_result``, devices (the tensors stay on the CPU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

RULES = ("padded", "exact")  # the 128x128 scale row stride: round_up(L, 4) (PyTorch <= 2.9) or L (>= 2.10)
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class OutOfBoundsScaleRead(RuntimeError):
    """cuBLAS would read a scale past the end of its tensor (garbage or an illegal address on a GPU)."""


def rule_for(version: str) -> str:
    """The 128x128 row-stride rule of a PyTorch version string (``"2.9.1+cu128"`` -> ``"padded"``)."""
    major, minor = (int(p) for p in re.match(r"(\d+)\.(\d+)", version).groups())
    return "padded" if (major, minor) < (2, 10) else "exact"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _size_stride(scale: torch.Tensor, dim: int, size: int, stride: int) -> bool:
    return scale.size(dim) == size and (size <= 1 or scale.stride(dim) == stride)


@dataclass
class Call:
    """One accepted call: the operand shapes and the scaling pair PyTorch chose."""

    m: int
    k: int
    n: int
    scaling: tuple[str, str]
    out_dtype: torch.dtype
    use_fast_accum: bool


@dataclass
class ScaledBlasModel:
    """``torch._scaled_mm`` as an SM90 GPU with PyTorch's ``rule`` would run it; ``calls`` lists what it ran."""

    rule: str = "exact"
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")

    # ---- the checks (ScaledBlas.cpp) ----
    def _matches(self, kind: str, t: torch.Tensor, scale: torch.Tensor) -> bool:
        if t.dtype not in _FLOAT8 or scale.dtype != torch.float32:
            return False
        rows, k = t.shape
        chunks = _ceil_div(k, 128)
        if kind == "TensorWise":
            return scale.numel() == 1
        if scale.dim() != 2:
            return False
        if kind == "RowWise":
            return scale.shape == (rows, 1) and scale.is_contiguous()
        if kind == "1x128":
            return _size_stride(scale, 0, rows, 1) and _size_stride(scale, 1, chunks, rows)
        row_stride = chunks if self.rule == "exact" else _ceil_div(chunks, 4) * 4
        return _size_stride(scale, 0, _ceil_div(rows, 128), row_stride) and _size_stride(scale, 1, chunks, 1)

    def scaling(self, mat1, mat2, scale_a, scale_b) -> tuple[str, str]:
        pairs = (("TensorWise", "TensorWise"), ("RowWise", "RowWise"), ("128x128", "1x128"),
                 ("1x128", "128x128"), ("1x128", "1x128"))
        for lhs, rhs in pairs:
            if self._matches(lhs, mat1, scale_a) and self._matches(rhs, mat2.t(), scale_b.t()):
                return lhs, rhs
        raise RuntimeError(
            f"Invalid scaling configuration (model of ScaledBlas.cpp, rule {self.rule}): mat1 {tuple(mat1.shape)},"
            f" mat2 {tuple(mat2.shape)}, scale_a size {tuple(scale_a.shape)} stride {scale_a.stride()},"
            f" scale_b size {tuple(scale_b.shape)} stride {scale_b.stride()}")

    def __call__(self, mat1, mat2, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None,
                 use_fast_accum=False):
        if bias is not None or scale_result is not None:
            raise NotImplementedError("the model has no bias or scale_result")
        if mat1.dim() != 2 or mat2.dim() != 2:
            raise RuntimeError("mat1 and mat2 must be matrices")
        if mat1.size(1) != mat2.size(0):
            raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({tuple(mat1.shape)} and"
                               f" {tuple(mat2.shape)})")
        scaling = self.scaling(mat1, mat2, scale_a, scale_b)
        (m, k), n = mat1.shape, mat2.size(1)
        if k % 16:
            raise RuntimeError(f"Expected trailing dimension of mat1 to be divisible by 16 but got mat1 shape:"
                               f" ({m}x{k})")
        if mat2.size(0) % 16 or n % 16:
            raise RuntimeError(f"mat2 shape ({mat2.size(0)}x{n}) must be divisible by 16")
        if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise NotImplementedError(f"the model computes bf16, fp16 or fp32 outputs, not {out_dtype}")
        self.calls.append(Call(m, k, n, scaling, out_dtype, use_fast_accum))
        if m == 0 or k == 0 or n == 0:
            return torch.zeros(m, n, dtype=out_dtype)
        row_major = mat1.stride(1) == 1 and mat1.stride(0) >= max(1, k)
        column_major = mat2.stride(0) == 1 and mat2.stride(1) >= max(1, k)
        if not (row_major and column_major):
            raise RuntimeError("Only multiplication of row-major and column-major matrices is supported by cuBLASLt")
        a = _dequantize(mat1, _read_scale(scale_a, scaling[0], (m, k), "scale_a"), scaling[0])
        b = _dequantize(mat2.t(), _read_scale(scale_b, scaling[1], (n, k), "scale_b"), scaling[1])
        return (a @ b.t()).to(out_dtype)


# ---- what cuBLAS reads ----
def _read_scale(scale: torch.Tensor, kind: str, shape, name: str) -> torch.Tensor:
    """The scales cuBLAS finds from ``scale``'s data pointer, as (rows or row blocks, chunks) of the
    operand in (rows, K) form (``mat2``'s scales are read for ``mat2^T``: N-major, or K-major)."""
    rows, k = shape
    chunks = _ceil_div(k, 128)
    if kind == "TensorWise":
        return scale.reshape(1, 1).expand(rows, 1)
    if kind == "RowWise":
        return scale.reshape(rows, 1)
    if kind == "1x128":  # M-major: element (i, c) at i + c * rows
        size, strides = (rows, chunks), (1, rows)
    else:  # K-major with a column stride of round_up(L, 4): element (p, c) at c + p * L4
        size, strides = (_ceil_div(rows, 128), chunks), (_ceil_div(chunks, 4) * 4, 1)
    last = scale.storage_offset() + sum((s - 1) * st for s, st in zip(size, strides))
    if last >= scale.untyped_storage().nbytes() // scale.element_size():
        raise OutOfBoundsScaleRead(f"cuBLAS would read {name} up to element {last}, past the end of its storage"
                                   f" ({kind} scale {tuple(scale.shape)} with strides {scale.stride()})")
    return torch.as_strided(scale, size, strides, scale.storage_offset())


def _dequantize(codes: torch.Tensor, scales: torch.Tensor, kind: str) -> torch.Tensor:
    """``codes * scale`` in fp32, one scale per element from the scaling ``kind``'s blocks."""
    rows, k = codes.shape
    if kind in ("TensorWise", "RowWise"):
        per_element = scales.expand(rows, k)
    else:
        per_row = scales if kind == "1x128" else scales.repeat_interleave(128, dim=0)[:rows]
        per_element = per_row.repeat_interleave(128, dim=1)[:, :k]
    return codes.to(torch.float32) * per_element
