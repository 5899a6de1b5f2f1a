"""Golden wire vectors of format version 13 (deferred row tiers: a full model's lightest
tier sends its base level where the order puts it, and decodes to its fill row until
then). Today's encoder cuts that tier in several and writes version 14 instead
(``test_golden_v14.py``), so these bytes are no longer written; every decoder must go
on reading them, to the values stored beside them (``NAME.pt``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsqueeze.codec import EncodedModel, decode_prefix, decode_state
from fedsqueeze.codec.container import DEFERRED_VERSION
from fedsqueeze.codec.model import smallest_prefix

GOLDEN = Path(__file__).parent.parent / "golden" / "v13"
NAMES = ("deferred-block32-hadamard-1+1+2+4", "deferred-symmetric-1+1+2-ans")


@pytest.mark.parametrize("name", NAMES)
def test_golden_v13_streams_decode_to_what_they_decoded_to(name: str) -> None:
    data = (GOLDEN / f"{name}.fsq").read_bytes()
    assert data[3] == DEFERRED_VERSION
    model = EncodedModel.from_bytes(data)
    want = torch.load(GOLDEN / f"{name}.pt", weights_only=True)
    decoded = decode_state(model)
    assert list(decoded) == list(want)
    for key, tensor in want.items():
        assert torch.equal(decoded[key], tensor), key
    (split,) = model.splits
    assert split.name == "large.weight" and split.deferred == 1 and split.count >= 3
    # the smallest prefix decodes, the deferred tier's rows at its fill row
    first = decode_prefix(data[: smallest_prefix(model)]).state["large.weight"]
    rows = split.indices[-1]
    fill = split.fill_row(split.count - 1, tuple(first.shape[1:]))
    assert torch.equal(first[rows], fill.expand(rows.numel(), *fill.shape))
    assert decode_prefix(data[:-4]).complete


def test_nothing_else_is_in_the_v13_folder() -> None:
    assert sorted(p.name for p in GOLDEN.iterdir()) == sorted(
        f"{n}{ext}" for n in NAMES for ext in (".fsq", ".pt")
    )
