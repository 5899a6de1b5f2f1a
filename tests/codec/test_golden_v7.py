"""Golden wire vectors of format version 7 (support levels: a pruned tensor's positions
arrive in groups, each refinement naming its group and plane): bytes change only with a
format version bump.

Regenerate (only together with a format version change) with:
    python -m tests.codec.test_golden_v7
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedsqueeze.codec import decode_prefix
from fedsqueeze.codec.container import SUPPORT_LEVELS_VERSION
from tests.codec.test_golden import check_golden, regenerate
from tests.codec.test_golden_v5 import _state, base_of, encode_text_case

GOLDEN = Path(__file__).parent.parent / "golden" / "v7"

CASES: dict[str, tuple[str, bool]] = {
    "grow-global-symmetric-2+2": (
        "prune=global:0.8,quant=4:symmetric,levels=2+2,float=fp16,grow=0.95+0.9",
        False,
    ),
    "grow-l1-channel-1+1+2-delta": ("prune=l1:0.7,quant=4:channel,levels=1+1+2,grow=0.9", True),
}


def _encode(name: str) -> bytes:
    return encode_text_case(*CASES[name])


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_v7_bytes_unchanged(name: str) -> None:
    base = base_of(CASES[name][1])
    encoded = _encode(name)
    decoded = check_golden(GOLDEN, name, encoded, SUPPORT_LEVELS_VERSION, base)
    assert set(decoded) == set(_state(0))
    assert decode_prefix(encoded[:-4], base).complete


if __name__ == "__main__":
    regenerate(GOLDEN, CASES, _encode)
    sys.exit(0)
