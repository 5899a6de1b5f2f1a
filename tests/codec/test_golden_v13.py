"""Golden wire vectors of format version 13 (deferred row tiers: a full model's light
tiers send their base level where the order puts it, and decode to their fill row until
then): bytes change only with a format version bump.

Regenerate (only together with a format version change) with:
    python -m tests.codec.test_golden_v13
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fedsqueeze.codec import EncodedModel, decode_prefix, encode_state
from fedsqueeze.codec.container import DEFERRED_VERSION
from fedsqueeze.codec.model import smallest_prefix
from fedsqueeze.codec.nested_gptq import Calibration
from fedsqueeze.codec.spec_text import parse_spec
from tests.codec.test_golden import check_golden, regenerate
from tests.codec.test_golden_v5 import _state
from tests.codec.test_golden_v11 import row_weights

GOLDEN = Path(__file__).parent.parent / "golden" / "v13"

CASES: dict[str, str] = {
    "deferred-block32-hadamard-1+1+2+4": "quant=8:block32:hadamard,levels=1+1+2+4",
    "deferred-symmetric-1+1+2-ans": "quant=4:symmetric,levels=1+1+2,entropy=ans",
}


def _encode(name: str) -> bytes:
    calibration = Calibration(rows={"large.weight": row_weights()}, defer=True)
    return encode_state(
        _state(0), parse_spec(CASES[name]), seed=0, calibration=calibration
    ).to_bytes()


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_v13_bytes_unchanged(name: str) -> None:
    encoded = _encode(name)
    decoded = check_golden(GOLDEN, name, encoded, DEFERRED_VERSION, None)
    assert set(decoded) == set(_state(0))
    model = EncodedModel.from_bytes(encoded)
    (split,) = model.splits
    assert split.name == "large.weight" and split.deferred == 1 and split.count >= 3
    # the smallest prefix decodes, the deferred tiers' rows at their fill rows
    first = decode_prefix(encoded[: smallest_prefix(model)]).state["large.weight"]
    held = {r.name for r in model.records[: model.base_records]}
    for k in range(split.first_deferred, split.count):
        if f"large.weight#tier{k}" not in held:
            rows = split.indices[k]
            fill = split.fill_row(k, tuple(first.shape[1:]))
            assert torch.equal(first[rows], fill.expand(rows.numel(), *fill.shape))
    assert decode_prefix(encoded[:-4]).complete


if __name__ == "__main__":
    regenerate(GOLDEN, CASES, _encode)
    sys.exit(0)
