"""Data-aware rounding of a matrix onto a scalar grid (GPTQ), and the nearest-rounding baseline.

A linear layer ``y = W x`` whose inputs ``x`` were seen on calibration data has the
output error ``E‖(W − Ŵ) x‖² = tr(ΔW H ΔWᵀ)`` with ``H = Σ x xᵀ`` (the layer's input
second moments, ``cols × cols``). Rounding each weight to its nearest grid point
minimises ``‖ΔW‖²``, not that. GPTQ (Frantar et al. 2023, after Optimal Brain
Quantization) rounds the columns one at a time and spreads each column's rounding error
over the columns not yet rounded, in the proportions ``H⁻¹`` gives, so that later
roundings compensate earlier ones on the calibration inputs::

    for each column j (left to right):
        q_j  = nearest grid point of w_j
        e_j  = (w_j − q_j) / [U]_jj                    U: the upper Cholesky factor of H⁻¹
        w_k −= e_j · [U]_jk    for every k > j

Rows are independent (the same ``H`` serves every row), so a column is a vector
operation over the rows; columns go in lazy batches of ``block`` whose updates to the
rest of the matrix are applied once per batch (the paper's "lazy batch" trick: the
same arithmetic, fewer passes over memory).

The grid (:class:`Grid`) is the receiver's: a value is ``scale[row, col // group] ·
levels[code]``, so the codes GPTQ picks decode with no knowledge of ``H``: the decoder
never needs the calibration data. With ``H`` a multiple of the identity the error
feedback is zero and GPTQ returns the nearest codes exactly (tested).

Pure functions on ``float64`` tensors on the CPU: a 1536 × 384 matrix takes well under
a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Grid",
    "Pick",
    "feedback",
    "gptq_codes",
    "nearest_codes",
    "normal_equations",
    "output_error",
    "prepare",
    "refit_levels",
    "uniform_grid",
]


@dataclass(frozen=True)
class Grid:
    """A scalar grid per scale group: value ``= scale[row, col // group] · levels[code]``.

    Attributes
    ----------
    scale
        ``[rows, ceil(cols / group)]`` positive scales (float64).
    group
        Columns per scale (a row's block).
    levels
        ``[L]`` ascending values in scale units (float64): code ``c`` decodes to
        ``levels[c]``.
    """

    scale: Tensor
    group: int
    levels: Tensor

    def __post_init__(self) -> None:
        if self.group < 1:
            raise ValueError(f"a scale group has at least one column, got {self.group}")
        if self.levels.ndim != 1 or self.levels.numel() < 2:
            raise ValueError("a grid has at least two levels")
        if bool((self.levels[1:] <= self.levels[:-1]).any()):
            raise ValueError("grid levels must ascend")
        if self.scale.ndim != 2 or bool((self.scale <= 0).any()):
            raise ValueError("scales are a [rows, groups] matrix of positive values")

    def column_scale(self, col: int) -> Tensor:
        """``[rows]`` scales of column ``col``."""
        return self.scale[:, col // self.group]

    def nearest(self, values: Tensor, col: int) -> Tensor:
        """``[rows]`` int64 codes of the grid points nearest ``values`` (column ``col``)."""
        units = values / self.column_scale(col)
        # midpoints between neighbouring levels: the code is how many lie below the value
        mids = (self.levels[1:] + self.levels[:-1]) / 2
        return torch.bucketize(units, mids)

    def decode(self, codes: Tensor) -> Tensor:
        """``[rows, cols]`` values of ``codes`` (``[rows, cols]`` int64)."""
        cols = codes.shape[1]
        scale = self.scale.repeat_interleave(self.group, dim=1)[:, :cols]
        return self.levels[codes] * scale


def uniform_grid(weight: Tensor, bits: int, group: int, clip: float = 1.0) -> Grid:
    """A symmetric mid-rise grid of ``2^bits`` levels per group of ``group`` columns,
    spanning ``± clip · max|w|`` of the group (levels at the centres of equal cells).

    Parameters
    ----------
    weight
        ``[rows, cols]`` float64.
    bits
        1 to 8.
    group
        Columns per scale (``cols`` for one scale per row).
    clip
        Fraction of the group's largest magnitude the outer cells end at (0 < clip ≤ 1).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip must be in (0, 1], got {clip}")
    rows, cols = weight.shape
    groups = -(-cols // group)
    padded = torch.zeros(rows, groups * group, dtype=torch.float64)
    padded[:, :cols] = weight.abs()
    peak = padded.reshape(rows, groups, group).amax(dim=2)
    half = 1 << (bits - 1)
    scale = (clip * peak / half).clamp_min(1e-12)
    levels = torch.arange(-half, half, dtype=torch.float64) + 0.5
    return Grid(scale=scale, group=group, levels=levels)


def nearest_codes(weight: Tensor, grid: Grid) -> Tensor:
    """``[rows, cols]`` int64 codes of each weight's nearest grid point (round to nearest)."""
    cols = weight.shape[1]
    scale = grid.scale.repeat_interleave(grid.group, dim=1)[:, :cols]
    mids = (grid.levels[1:] + grid.levels[:-1]) / 2
    return torch.bucketize(weight.to(torch.float64) / scale, mids)


def output_error(weight: Tensor, approx: Tensor, hessian: Tensor) -> float:
    """``tr(ΔW H ΔWᵀ)``: the squared output error of ``approx`` on the calibration inputs."""
    delta = (weight - approx).to(torch.float64)
    return float(((delta @ hessian.to(torch.float64)) * delta).sum())


def gptq_codes(
    weight: Tensor,
    hessian: Tensor,
    grid: Grid,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
) -> Tensor:
    """GPTQ codes of ``weight`` on ``grid`` for the input moments ``hessian``.

    Parameters
    ----------
    weight
        ``[rows, cols]`` float (not modified).
    hessian
        ``[cols, cols]`` symmetric positive semi-definite ``Σ x xᵀ`` of the layer's inputs.
    grid
        The receiver's grid (its scales fixed beforehand).
    damp
        Added to the diagonal, as a fraction of its mean (keeps ``H`` invertible when
        the calibration inputs span fewer than ``cols`` directions).
    block
        Columns per lazy batch.
    act_order
        Round the columns in order of falling ``H`` diagonal (the inputs with most
        energy first, while the most columns are left to compensate), not left to
        right; the grid's scales stay those of the original columns.

    Returns
    -------
    Tensor
        ``[rows, cols]`` int64 codes; ``grid.decode`` gives the values.
    """
    w, upper, perm = prepare(weight, hessian, damp, act_order)

    def pick(col: Tensor, original: int) -> tuple[Tensor, Tensor]:
        code = grid.nearest(col, original)
        return code, grid.levels[code] * grid.column_scale(original)

    return feedback(w, upper, perm, pick, block)


#: Rounds one column: (values ``[rows]``, original column index) → (codes, decoded values).
Pick = Callable[[Tensor, int], tuple[Tensor, Tensor]]


def prepare(
    weight: Tensor, hessian: Tensor, damp: float = 0.01, act_order: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """The permuted float64 weight, the upper Cholesky factor of the damped ``H⁻¹`` in
    the same order, and the permutation (see :func:`gptq_codes`)."""
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"a {rows}x{cols} weight needs a {cols}x{cols} hessian")
    if damp < 0:
        raise ValueError("damp must be >= 0")
    w = weight.to(torch.float64).clone()
    h = hessian.to(torch.float64).clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    mean_diag = float(torch.diagonal(h).mean())
    h += torch.eye(cols, dtype=torch.float64) * (damp * mean_diag)
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    else:
        perm = torch.arange(cols)
    h = h[perm][:, perm]
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return w[:, perm], torch.linalg.cholesky(inverse, upper=True), perm


def feedback(w: Tensor, upper: Tensor, perm: Tensor, pick: Pick, block: int = 128) -> Tensor:
    """GPTQ's column loop over ``w`` (``[rows, cols]``, permuted, float64; not modified)
    with ``pick`` rounding each column; returns ``[rows, cols]`` int64 codes in the
    original column order."""
    if block < 1:
        raise ValueError("block must be >= 1")
    w = w.clone()
    rows, cols = w.shape
    codes = torch.empty(rows, cols, dtype=torch.int64)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        part = w[:, start:end].clone()
        errors = torch.empty_like(part)
        u = upper[start:end, start:end]
        for i in range(end - start):
            col = part[:, i]
            original = int(perm[start + i])
            code, value = pick(col, original)
            codes[:, original] = code
            err = (col - value) / u[i, i]
            part[:, i:] -= err.unsqueeze(1) * u[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, end:] -= errors @ upper[start:end, end:]
    return codes


def normal_equations(basis: list[Tensor], target: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """``(A, b)`` of the least squares ``min_t tr(E H Eᵀ)``, ``E = target − Σ_c t_c B_c``
    (float64 ``[rows, cols]`` matrices ``B_c`` in ``basis``, ``H`` ``[cols, cols]``):
    ``A_cd = tr(B_c H B_dᵀ)``, ``b_c = tr(B_c H targetᵀ)``; solve ``A t = b``."""
    count = len(basis)
    a = torch.empty(count, count, dtype=torch.float64)
    b = torch.empty(count, dtype=torch.float64)
    for c in range(count):
        mc_h = basis[c] @ h
        b[c] = (mc_h * target).sum()
        for d in range(count):
            a[c, d] = (mc_h * basis[d]).sum()
    return a, b


def refit_levels(weight: Tensor, codes: Tensor, grid: Grid, hessian: Tensor | None = None) -> Grid:
    """``grid`` with its levels re-fitted to ``codes`` by least squares (scales kept).

    Without ``hessian`` the levels minimise ``‖W − Ŵ‖²``: each level becomes the
    ``scale²``-weighted mean of its weights in scale units (the progressive codec's
    bucket-mean table). With ``hessian`` they minimise ``tr(ΔW H ΔWᵀ)``, a
    ``L × L`` linear system. A level no weight uses keeps its value; levels that come out
    out of order are sorted back with their codes unchanged only if they stay ascending,
    otherwise the old grid is returned (a decoder needs ascending levels).
    """
    cols = weight.shape[1]
    count = grid.levels.numel()
    scale = grid.scale.repeat_interleave(grid.group, dim=1)[:, :cols]
    w = weight.to(torch.float64)
    flat = codes.reshape(-1)
    used = torch.bincount(flat, minlength=count) > 0
    if hessian is None:
        num = torch.bincount(flat, weights=(scale * w).reshape(-1), minlength=count)
        den = torch.bincount(flat, weights=scale.square().reshape(-1), minlength=count)
        levels = torch.where(used, num / den.clamp_min(1e-300), grid.levels)
    else:
        basis = [(scale * (codes == c)).to(torch.float64) for c in range(count)]
        a, b = normal_equations(basis, w, hessian.to(torch.float64))
        a += torch.diag((~used).to(torch.float64))
        b = torch.where(used, b, grid.levels)
        levels = torch.linalg.solve(a, b)
    if bool((levels[1:] <= levels[:-1]).any()):
        return grid
    return Grid(scale=grid.scale, group=grid.group, levels=levels)
