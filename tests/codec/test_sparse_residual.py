"""Top-k's error-feedback residual: built in place in the encoder's own temporary when
there is one (a residual or base was added), copied otherwise; either way the same
values (without a base: exactly ``input − decoded``), and the caller's tensors are left
alone."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedsqueeze.codec import tensor_encode
from fedsqueeze.codec.model import EncodedModel, decode_state, encode_state
from fedsqueeze.codec.spec_text import parse_spec


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("n", [1_000, 3_000_001])  # exact selection; the sampled one
def test_residual_in_place_or_copied(
    with_residual: bool, with_base: bool, n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = torch.Generator().manual_seed(n)
    t = torch.randn(n, generator=g)
    base = {"w": torch.randn(n, generator=g) * 0.1} if with_base else None
    r = {"w": torch.randn(n, generator=g) * 0.01} if with_residual else None
    before = [t.clone()] + [d["w"].clone() for d in (base, r) if d is not None]
    spec = parse_spec("topk10-int4")
    enc = encode_state({"w": t}, spec, base=base, residual=r, seed=0)
    assert enc.residual is not None
    got = enc.residual["w"]
    after = [t] + [d["w"] for d in (base, r) if d is not None]
    for old, now in zip(before, after, strict=True):
        assert torch.equal(bits(old), bits(now))  # nothing the caller holds changed

    residual = tensor_encode._residual

    def copied(
        flat: torch.Tensor, indices: Any, values: Any, decoded: Any, shape: Any, owned: bool = False
    ) -> torch.Tensor:
        return residual(flat, indices, values, decoded, shape, False)

    monkeypatch.setattr(tensor_encode, "_residual", copied)
    again = encode_state({"w": t}, spec, base=base, residual=r, seed=0)
    assert again.to_bytes() == enc.to_bytes()
    assert again.residual is not None
    assert torch.equal(bits(again.residual["w"]), bits(got))
    if base is None:
        decoded = decode_state(EncodedModel.from_bytes(enc.to_bytes()))["w"]
        x = t if r is None else t + r["w"]
        kept = decoded != 0
        expected = x.clone()
        expected[kept] = x[kept] - decoded[kept]
        assert torch.equal(bits(got), bits(expected))
