"""Golden wire vectors of format version 11 (row tiers: a table's rows split by weight,
each tier a progressive tensor of its own, the tier map in the header): bytes change
only with a format version bump.

Regenerate (only together with a format version change) with:
    python -m tests.codec.test_golden_v11
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fedsqueeze.codec import EncodedModel, decode_prefix, encode_state
from fedsqueeze.codec.container import ROW_TIERS_VERSION
from fedsqueeze.codec.nested_gptq import Calibration
from fedsqueeze.codec.spec_text import parse_spec
from tests.codec.test_golden import check_golden, regenerate
from tests.codec.test_golden_v5 import _state, base_of

GOLDEN = Path(__file__).parent.parent / "golden" / "v11"

CASES: dict[str, tuple[str, bool]] = {
    "tiers-block32-hadamard-1+1+2+4": ("quant=8:block32:hadamard,levels=1+1+2+4", False),
    "tiers-channel-2+2+4-delta": ("quant=8:channel,levels=2+2+4", True),
    "tiers-symmetric-1+1+2-ans": ("quant=4:symmetric,levels=1+1+2,entropy=ans", False),
}


def row_weights() -> torch.Tensor:
    """Weights of ``large.weight``'s 96 rows: exact, a few rows heavy, a third unread."""
    w = torch.tensor([float(1 << (i % 13)) for i in range(96)], dtype=torch.float64)
    w[64:] = 0.0
    return w


def _encode(name: str) -> bytes:
    text, delta = CASES[name]
    calibration = Calibration(rows={"large.weight": row_weights()}, defer=False)
    return encode_state(
        _state(0), parse_spec(text), base_of(delta), seed=0, calibration=calibration
    ).to_bytes()


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_v11_bytes_unchanged(name: str) -> None:
    base = base_of(CASES[name][1])
    encoded = _encode(name)
    decoded = check_golden(GOLDEN, name, encoded, ROW_TIERS_VERSION, base)
    assert set(decoded) == set(_state(0))
    (split,) = EncodedModel.from_bytes(encoded).splits
    assert split.name == "large.weight" and split.count >= 3
    assert decode_prefix(encoded[:-4], base).complete


if __name__ == "__main__":
    regenerate(GOLDEN, CASES, _encode)
    sys.exit(0)
