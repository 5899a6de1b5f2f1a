"""Calibrated progressive codes: nested across levels, in range, output error falling."""

from __future__ import annotations

import itertools
from typing import NamedTuple

import pytest
import torch

from fedsqueeze.codec.gptq import output_error
from fedsqueeze.codec.kernels import Runs
from fedsqueeze.codec.nested_gptq import nested_codes, rotated_hessian
from fedsqueeze.codec.quantization import QuantParams
from fedsqueeze.codec.rotation import rotate

LEVELS = (2, 1, 1, 1, 1, 2)
BITS = 8


def _problem(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(20, 64, generator=g, dtype=torch.float64)
    x = torch.randn(300, 64, generator=g, dtype=torch.float64) @ torch.randn(
        64, 64, generator=g, dtype=torch.float64
    )
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).expand_as(w)
    return w, x.T @ x, scale, torch.full_like(w, 128.0)


def _midpoints() -> list[torch.Tensor | None]:
    out: list[torch.Tensor | None] = []
    held = 0
    for add in LEVELS:
        held += add
        shift = BITS - held
        out.append(None if shift == 0 else torch.full((1 << held,), ((1 << shift) - 1) / 2))
    return out


def _decode(codes: torch.Tensor, level: int, tables: list[torch.Tensor | None],
            scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:  # fmt: skip
    held = sum(LEVELS[: level + 1])
    shift = BITS - held
    top = codes >> shift
    table = tables[level]
    off = torch.zeros_like(scale) if table is None else table.to(torch.float64)[top]
    return ((top << shift).to(torch.float64) + off - zp) * scale


@pytest.mark.parametrize("seed", range(4))
def test_levels_nest_stay_in_range_and_output_error_falls(seed: int) -> None:
    w, h, scale, zp = _problem(seed)
    tables = _midpoints()
    codes = nested_codes(w, h, scale, zp, BITS, LEVELS, tables, (1, 255))
    assert int(codes.min()) >= 1 and int(codes.max()) <= 255
    errors = [output_error(w, _decode(codes, k, tables, scale, zp), h) for k in range(6)]
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    # against nearest rounding at the first level, on the same grid
    nearest = torch.clamp(torch.round(w / scale + zp), 1, 255).to(torch.int64)
    first_rtn = output_error(w, _decode(nearest, 0, tables, scale, zp), h)
    assert errors[0] < first_rtn
    # the trust region: every code within the margin of the nearest one
    bounded = nested_codes(w, h, scale, zp, BITS, LEVELS, tables, (1, 255), nearest, margin=3)
    assert int((bounded - nearest).abs().max()) <= 3
    assert not torch.equal(bounded, nearest)
    zero = nested_codes(w, h, scale, zp, BITS, LEVELS, tables, (1, 255), nearest, margin=0)
    assert torch.equal(zero, nearest)


def test_rotated_hessian_keeps_the_output_error() -> None:
    w, h, _, _ = _problem(9)
    delta = torch.randn(w.shape, dtype=torch.float64)
    seed = 1234
    rotated = rotate(delta.to(torch.float32), seed).to(torch.float64)
    before = output_error(w, w - delta, h)
    after = output_error(w, w - rotated, rotated_hessian(h, seed))
    assert after == pytest.approx(before, rel=1e-4)


def test_bad_arguments_raise() -> None:
    w, h, scale, zp = _problem(0)
    with pytest.raises(ValueError):
        nested_codes(w, h, scale, zp, BITS, (2, 2), _midpoints()[:2], (1, 255))
    with pytest.raises(ValueError):
        nested_codes(w, h, scale, zp, BITS, LEVELS, _midpoints(), (0, 256))


class _Quantized(NamedTuple):
    """A per-row symmetric 8-bit matrix cut into ``levels``, as the progressive encoder
    makes it (nearest codes, bucket-mean tables), and the generator that drew it."""

    g: torch.Generator
    weights: torch.Tensor
    values: torch.Tensor
    seed: int | None
    runs: Runs
    qp: QuantParams
    codes: torch.Tensor
    tables: list[torch.Tensor | None]


def _quantized(
    draw: int, rows: int, cols: int, levels: tuple[int, ...], seed: int | None
) -> _Quantized:
    from fedsqueeze.codec.progressive import bucket_table, cumulative_bits
    from fedsqueeze.codec.quantization import choose_qparams, quantize
    from fedsqueeze.codec.spec import Granularity, QuantScheme, Rounding

    g = torch.Generator().manual_seed(draw)
    weights = torch.randn(rows, cols, generator=g)
    values = (rotate(weights, seed) if seed is not None else weights).reshape(-1)
    runs = Runs(cols)
    qp = choose_qparams(values, 8, QuantScheme.SYMMETRIC, Granularity.PER_CHANNEL, runs, rows)
    codes = quantize(values, qp, Rounding.NEAREST, runs)
    last = len(levels) - 1
    tables = [
        bucket_table(codes, qp, cumulative_bits(levels, k), runs) if k < last else None
        for k in range(len(levels))
    ]
    return _Quantized(g, weights, values, seed, runs, qp, codes, tables)


@pytest.mark.parametrize("rotated", [False, True])
def test_output_gains_are_the_output_error_each_level_removes(rotated: bool) -> None:
    from fedsqueeze.codec.nested_gptq import output_gains
    from fedsqueeze.codec.progressive import level_gains

    rows, cols, levels = 12, 32, (2, 2, 4)
    g, weights, values, seed, runs, qp, codes, tables = _quantized(
        4, rows, cols, levels, 7 if rotated else None
    )
    # isotropic inputs: the squared error's gains
    eye = output_gains((rows, cols), values, codes, qp, levels, tables, runs, torch.eye(cols), seed)
    plain = level_gains(values, codes, qp, levels, tables, runs)
    assert eye == pytest.approx(plain, rel=1e-6)
    # correlated inputs: the gains add up to the output error the whole stream removes
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64)
    h = mix @ mix.T
    gains = output_gains((rows, cols), values, codes, qp, levels, tables, runs, h, seed)
    decoded = torch.empty_like(values)
    level_gains(values, codes, qp, levels, tables, runs, decoded)
    # the last level's values, as level_gains gives them (the encoder's residual)
    same = torch.empty_like(values)
    output_gains((rows, cols), values, codes, qp, levels, tables, runs, h, seed, same)
    assert torch.equal(same, decoded)
    w = weights.to(torch.float64)
    back = decoded.reshape(rows, cols)
    if seed is not None:
        from fedsqueeze.codec.rotation import unrotate

        back = unrotate(back, seed, (rows, cols))
    scale = cols / float(torch.diagonal(h).sum())
    removed = (output_error(w, torch.zeros_like(w), h) - output_error(w, back.double(), h)) * scale
    assert sum(gains) == pytest.approx(removed, rel=1e-6)
    with pytest.raises(ValueError, match="hessian of shape"):
        output_gains((rows, cols), values, codes, qp, levels, tables, runs, torch.eye(3), seed)


@pytest.mark.parametrize("rotated", [False, True])
def test_output_tables_lower_the_coarse_levels_output_error(rotated: bool) -> None:
    from fedsqueeze.codec.nested_gptq import output_tables
    from fedsqueeze.codec.progressive import (
        cumulative_bits,
        reconstruct,
        table_from_bytes,
        table_to_bytes,
    )

    rows, cols, levels = 16, 48, (2, 1, 1, 4)
    g, _, values, seed, runs, qp, codes, tables = _quantized(
        5, rows, cols, levels, 3 if rotated else None
    )
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64)
    h = mix @ mix.T  # correlated inputs
    hb = rotated_hessian(h, seed) if seed is not None else h
    refit = output_tables((rows, cols), values, codes, qp, levels, tables, runs, h, seed)
    assert refit[-1] is None and len(refit) == len(tables)
    x = values.reshape(rows, cols).to(torch.float64)
    changed = 0
    for k in range(3):
        held = cumulative_bits(levels, k)
        top = codes.to(torch.int64) >> (8 - held)
        new, old = refit[k], tables[k]
        assert new is not None and old is not None
        # stored as the stream stores them, and inside their buckets (the decoder checks)
        assert torch.equal(
            table_from_bytes(table_to_bytes(new), 1 << held, qp.scheme, 8 - held), new
        )

        def err(table: torch.Tensor, top: torch.Tensor = top, held: int = held) -> float:
            e = x - reconstruct(top, qp, held, table, runs).reshape(rows, cols).to(torch.float64)
            return float(((e @ hb) * e).sum())

        assert err(new) <= err(old)
        changed += not torch.equal(new, old)
    assert changed >= 2  # correlated inputs: the bucket means are not the best offsets
