"""The matrix of a 2-d convolution as a scipy sparse matrix, built from the kernel's index pattern (for the
LP and MILP, which need ``W`` explicitly)."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def conv_matrix(weight: np.ndarray, in_shape, out_shape, stride, padding, dilation) -> sp.csr_matrix:
    """``W`` (csr, float64, (out_features, in_features)) of a zero-padded convolution with ``weight``
    (C_out, C_in, kh, kw): row (c_o, y_o, x_o) holds ``weight[c_o, c_i, k_y, k_x]`` at the input
    (c_i, y_o s_0 − p_0 + k_y d_0, x_o s_1 − p_1 + k_x d_1) wherever that pixel exists."""
    (c_out, c_in, kh, kw), (_, h, w), (_, oh, ow) = weight.shape, in_shape, out_shape
    co, oy, ox, ci, ky, kx = np.meshgrid(*map(np.arange, (c_out, oh, ow, c_in, kh, kw)), indexing="ij")
    y = oy * stride[0] - padding[0] + ky * dilation[0]
    x = ox * stride[1] - padding[1] + kx * dilation[1]
    keep = (y >= 0) & (y < h) & (x >= 0) & (x < w)
    rows, cols = ((co * oh + oy) * ow + ox)[keep], ((ci * h + y) * w + x)[keep]
    m = sp.csr_matrix((weight.astype(np.float64)[co, ci, ky, kx][keep], (rows, cols)),
                      shape=(c_out * oh * ow, c_in * h * w))
    m.eliminate_zeros()
    return m


__all__ = ["conv_matrix"]
