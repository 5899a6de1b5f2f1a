"""Low-rank factorization of a tensor: the codec's PowerSGD-style stage for updates.

A target tensor of shape ``[m, ...]`` is seen as an ``m × n`` matrix (``n = numel / m``:
a linear layer's ``[out, in]``, a convolution's ``[out, in·kh·kw]``) and replaced by two
factors ``A`` (``m × r``) and ``B`` (``r × n``) whose product is its best rank-``r``
approximation in the Frobenius norm (Eckart–Young: the truncated SVD). The factors hold
``r·(m + n)`` values instead of ``m·n``; a record is only worth it when that is fewer.

Why: a client's update after a few local steps is a sum of gradient outer products, so
most of its energy lies in a few directions. On updates like the default sweep's (2
epochs on a Dirichlet(0.5) digits client, the CNN), rank 3 with 4-bit values (about
1.2 kB) misses 9 % of the update's squared norm, where top-k 5 % with 2-bit k-means
values (about 1.7 kB, positions included) misses 43 % (``python -m
tests.codec.test_lowrank`` prints the comparison; its test checks it). Error feedback
carries what the rank drops into the next round.

The split ``A = U·√S·c``, ``B = √S·Vᵀ / c`` with ``c = (m/n)^¼`` gives the entries of both
factors the same typical size, so one set of quantization parameters suits both. The
decoder only multiplies ``A @ B``: how the factors were found is the encoder's business.
Small matrices use LAPACK's SVD; large ones a seeded randomized SVD (Halko et al. 2011,
two power iterations), so the same input always gives the same factors. Everything runs
on the tensor's own device (MPS, which has no float64, borrows the CPU).

Why float64 and fixed signs: in float32 the factors depended on the machine. MKL and
ATen pick kernels by the CPU's instruction set, and two Xeons gave factors that differed
by 1e-7, enough to move quantization codes, so the same model encoded to different bytes
(and digests) on two coordinators. The factorization now runs in float64 and rounds to
float32 at the end, and each singular pair's sign is fixed (the largest entry of each
``U`` column is positive; LAPACK leaves the sign free). Different kernels then agree to
float32 in practice. The large-matrix path converts the input to float64 a block of rows
at a time, so its extra memory stays a few MiB plus the ``m × (r + 8)`` sketch.
"""

from __future__ import annotations

import torch

__all__ = [
    "EXACT_SVD_MAX_ELEMENTS",
    "factor_count",
    "factorize",
    "matrix_shape",
    "pays_off",
    "worth_factoring",
]

#: Matrices up to this many elements get an exact SVD; larger ones a randomized one.
EXACT_SVD_MAX_ELEMENTS = 1 << 22
_OVERSAMPLE = 8
_POWER_ITERATIONS = 2
_SKETCH_SEED = 0x5EED


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``m × n`` matrix a tensor of ``shape`` (two or more dimensions) is seen as."""
    if len(shape) < 2:
        raise ValueError(f"low-rank factorization needs >= 2 dimensions, got shape {shape}")
    m = shape[0]
    n = 1
    for d in shape[1:]:
        n *= d
    return m, n


def factor_count(m: int, n: int, rank: int) -> int:
    """Values in the two factors of a rank-``rank`` ``m × n`` matrix."""
    return rank * (m + n)


def pays_off(m: int, n: int, rank: int) -> bool:
    """Whether rank-``rank`` factors of an ``m × n`` matrix hold fewer values than it.

    The decoder's rule: a record that breaks it is malformed.
    """
    return rank >= 1 and factor_count(m, n, rank) < m * n


def worth_factoring(m: int, n: int, rank: int) -> bool:
    """Whether the encoder factors an ``m × n`` matrix: the factors at most half its size.

    PyTorch's PowerSGD hook has the same rule (``min_compression_rate=2``). Below it the
    bytes saved are few and the error is not: a 10-class classifier's ``10 × 64`` update
    at rank 5 would save 135 bytes at 4 bits and lose the directions of half the classes.
    """
    return rank >= 1 and 2 * factor_count(m, n, rank) <= m * n


def factorize(
    x: torch.Tensor, rank: int, *, exact_max_elements: int = EXACT_SVD_MAX_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors ``(A, B)`` of the best rank-``rank`` approximation of ``x``.

    Parameters
    ----------
    x
        A finite float32 matrix ``m × n`` with ``rank <= min(m, n)``.
    rank
        The rank ``r`` of the approximation.
    exact_max_elements
        Matrices with more elements use the randomized SVD.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``A`` (``m × r``) and ``B`` (``r × n``), float32, on ``x``'s device (computed in
        float64).
    """
    if x.dim() != 2:
        raise ValueError(f"factorize needs a matrix, got {x.dim()} dimensions")
    m, n = x.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} is not in 1..{min(m, n)} for a {m}×{n} matrix")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("cannot factorize a tensor with NaN or infinite values")
    home = x.device
    work = x if home.type != "mps" else x.cpu()
    if x.numel() <= exact_max_elements:
        u, s, vh = torch.linalg.svd(work.to(torch.float64), full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, vh = _randomized_svd(work, rank)
    u, vh = _fixed_signs(u, vh)
    root = s.clamp_min(0).sqrt()
    balance = (m / n) ** 0.25
    a = (u * (root * balance)).to(torch.float32)
    b = ((root / balance)[:, None] * vh).to(torch.float32)
    return a.contiguous().to(home), b.contiguous().to(home)


def _fixed_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, Vᵀ)`` with each pair's sign chosen so that ``U``'s largest entry is positive."""
    rows = u.abs().argmax(dim=0)
    signs = torch.sign(u[rows, torch.arange(u.shape[1], device=u.device)])
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, vh * signs[:, None]


#: Rows of the input converted to float64 at a time in the randomized SVD (elements).
_BLOCK_ELEMENTS = 1 << 20


def _row_blocks(x: torch.Tensor) -> list[tuple[int, int]]:
    step = max(1, _BLOCK_ELEMENTS // max(1, x.shape[1]))
    return [(i, min(i + step, x.shape[0])) for i in range(0, x.shape[0], step)]


def _randomized_svd(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets (float64) from a seeded sketch with power iterations.

    ``x`` stays in its own dtype; each product reads it a block of rows at a time in
    float64, in a fixed order.
    """
    m, n = x.shape
    width = min(rank + _OVERSAMPLE, m, n)
    f64 = torch.float64
    gen = torch.Generator(device=x.device)
    gen.manual_seed(_SKETCH_SEED)
    omega = torch.randn(n, width, generator=gen, device=x.device, dtype=f64)
    blocks = _row_blocks(x)

    def times(right: torch.Tensor) -> torch.Tensor:  # x @ right
        out = torch.empty(m, right.shape[1], dtype=f64, device=x.device)
        for i, j in blocks:
            torch.matmul(x[i:j].to(f64), right, out=out[i:j])
        return out

    def transposed_times(left: torch.Tensor) -> torch.Tensor:  # left.T @ x, as (x.T @ left).T
        out = torch.zeros(left.shape[1], n, dtype=f64, device=x.device)
        for i, j in blocks:
            out += left[i:j].T @ x[i:j].to(f64)
        return out

    q, _ = torch.linalg.qr(times(omega))
    for _ in range(_POWER_ITERATIONS):
        z, _ = torch.linalg.qr(transposed_times(q).T)
        q, _ = torch.linalg.qr(times(z))
    ub, s, vh = torch.linalg.svd(transposed_times(q), full_matrices=False)
    u = q @ ub
    return u[:, :rank], s[:rank], vh[:rank]
