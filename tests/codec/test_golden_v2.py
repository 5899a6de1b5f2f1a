"""Golden wire vectors of format version 2 (progressive levels): bytes change only with a
format version bump.

Regenerate (only together with a format version change) with:
    python -m tests.codec.test_golden_v2
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedsqueeze.codec import (
    CodecSpec,
    Granularity,
    PruneMethod,
    PruneSpec,
    QuantScheme,
    QuantSpec,
    decode_prefix,
)
from fedsqueeze.codec.container import PROGRESSIVE_VERSION
from tests.codec.test_golden import _state, check_golden, encode_case, regenerate

GOLDEN = Path(__file__).parent.parent / "golden" / "v2"

CASES: dict[str, tuple[CodecSpec, bool]] = {
    "levels-affine-2+2+4": (CodecSpec(quant=QuantSpec(8), levels=(2, 2, 4)), False),
    "levels-symmetric-channel-delta": (
        CodecSpec(
            quant=QuantSpec(4, QuantScheme.SYMMETRIC, Granularity.PER_CHANNEL), levels=(2, 2)
        ),
        True,
    ),
    "levels-prune-l1": (
        CodecSpec(
            prune=PruneSpec(PruneMethod.L1_UNSTRUCTURED, 0.5), quant=QuantSpec(4), levels=(1, 3)
        ),
        False,
    ),
}


def _encode(name: str) -> bytes:
    return encode_case(*CASES[name])


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_v2_bytes_unchanged(name: str) -> None:
    _spec, delta = CASES[name]
    base = _state(1) if delta else None
    encoded = _encode(name)
    decoded = check_golden(GOLDEN, name, encoded, PROGRESSIVE_VERSION, base)
    assert set(decoded) == set(_state(0))
    assert decode_prefix(encoded[:-4], base).complete


if __name__ == "__main__":
    regenerate(GOLDEN, CASES, _encode)
    sys.exit(0)
