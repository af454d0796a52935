"""Blocks of columns of the linearised network (Algorithm 1's forward pass), in the layout (B|1, n, c):
one-hot bases, the columns ``W e_q`` of an operator at chosen units, and operators applied to blocks."""
from __future__ import annotations

import torch

from .patches import PatchRows
from ..network import Affine, LinearOp

MAX_DENSE = 2 ** 26  # entries of an operator's dense matrix that unit_columns may build


def basis(n: int, start: int, count: int, device, dtype) -> torch.Tensor:
    """Rows ``e_start … e_{start+count−1}`` of the n×n identity, (count, n)."""
    E = torch.zeros(count, n, device=device, dtype=dtype)
    E[torch.arange(count, device=device), torch.arange(start, start + count, device=device)] = 1.0
    return E


def matrix_transpose(A: Affine, device, dtype) -> torch.Tensor:
    """``Wᵀ`` (n_in, n_out) of A's linear part: every column written down (``A.direct_columns``), else A
    applied to the identity (row q = column q of W)."""
    if A.direct_columns:
        return A.columns(torch.arange(A.in_features, device=device).unsqueeze(0))[0].t()
    eye = torch.eye(A.in_features, device=device, dtype=dtype).reshape(A.in_features, *A.in_shape)
    return A.linear(eye).reshape(A.in_features, -1)


def unit_columns(A: Affine, order: torch.Tensor, budget: int) -> torch.Tensor:
    """Columns ``order`` (B, q) of A's matrix as (B, n_out, q): a gather from the dense matrix when there
    are at least as many as its columns (``budget`` = B·q), else :meth:`~polytope_lab.network.Affine.columns`
    (written down for a convolution, one-hot inputs through A in general)."""
    if isinstance(A, LinearOp):
        return A.columns(order)
    ref = A.bias()
    if A.in_features <= budget and A.in_features * A.out_features <= MAX_DENSE:
        return matrix_transpose(A, ref.device, ref.dtype)[order].transpose(1, 2)
    return A.columns(order)


def apply(A: Affine, M: torch.Tensor) -> torch.Tensor:
    """A's linear part on every column of M (B|1, n_in, c): (B|1, n_out, c)."""
    if isinstance(A, LinearOp):
        return torch.matmul(A.weight, M)
    Bm, _, c = M.shape
    return A.linear(M.transpose(1, 2).reshape(Bm * c, *A.in_shape)).reshape(Bm, c, -1).transpose(1, 2)


def push(A: Affine, d: torch.Tensor, M) -> torch.Tensor:
    """``A·(d ⊙ column)`` for every column of M (B|1, n, c) or :class:`PatchRows`, with d (B, n): (B, n', c)."""
    if isinstance(M, PatchRows):
        if isinstance(A, LinearOp):
            return M.left_multiply(A.weight * d.unsqueeze(1))
        M = M.dense()
    if isinstance(A, LinearOp):
        return torch.matmul(A.weight * d.unsqueeze(1), M)                     # (W D) M: no (B, n, c) temporary
    return apply(A, d.unsqueeze(2) * M)


__all__ = ["basis", "matrix_transpose", "unit_columns", "apply", "push"]
