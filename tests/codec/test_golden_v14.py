"""Golden wire vectors of format version 14 (a table in more than 8 row tiers: the
lightest band cut into several deferred tiers, each decoding to its own fill row until
its base level arrives): bytes change only with a format version bump.

Regenerate (only together with a format version change) with:
    python -m tests.codec.test_golden_v14
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fedsqueeze.codec import EncodedModel, decode_prefix, encode_state
from fedsqueeze.codec.container import WIDE_TIERS_VERSION
from fedsqueeze.codec.model import smallest_prefix
from fedsqueeze.codec.nested_gptq import Calibration
from fedsqueeze.codec.row_tiers import BANDS
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.codec.tier_plan import DEFERRED_TIERS
from tests.codec.test_golden import check_golden, regenerate
from tests.codec.test_golden_v5 import _state
from tests.codec.test_golden_v11 import row_weights

GOLDEN = Path(__file__).parent.parent / "golden" / "v14"

CASES: dict[str, str] = {
    "deferred-cut-block32-hadamard-1+1+2+4": "quant=8:block32:hadamard,levels=1+1+2+4",
    "deferred-cut-symmetric-1+1+2-ans": "quant=4:symmetric,levels=1+1+2,entropy=ans",
}


def _encode(name: str) -> bytes:
    calibration = Calibration(rows={"large.weight": row_weights()}, defer=True)
    return encode_state(
        _state(0), parse_spec(CASES[name]), seed=0, calibration=calibration
    ).to_bytes()


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_v14_bytes_unchanged(name: str) -> None:
    encoded = _encode(name)
    decoded = check_golden(GOLDEN, name, encoded, WIDE_TIERS_VERSION, None)
    assert set(decoded) == set(_state(0))
    model = EncodedModel.from_bytes(encoded)
    (split,) = model.splits
    # the lightest band in DEFERRED_TIERS deferred tiers, beyond version 13's 8 tiers
    assert split.name == "large.weight" and split.deferred == DEFERRED_TIERS
    assert split.count > BANDS
    # the smallest prefix decodes, each deferred tier not held yet at its own fill row
    first = decode_prefix(encoded[: smallest_prefix(model)]).state["large.weight"]
    held = {r.name for r in model.records[: model.base_records]}
    fills = set()
    for k in range(split.first_deferred, split.count):
        assert f"large.weight#tier{k}" not in held
        rows = split.indices[k]
        fill = split.fill_row(k, tuple(first.shape[1:]))
        assert torch.equal(first[rows], fill.expand(rows.numel(), *fill.shape))
        fills.add(fill.numpy().tobytes())
    assert len(fills) == split.deferred  # each its own mean row
    assert decode_prefix(encoded[:-4]).complete


if __name__ == "__main__":
    regenerate(GOLDEN, CASES, _encode)
    sys.exit(0)
