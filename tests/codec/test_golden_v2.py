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
    EncodedModel,
    Granularity,
    PruneMethod,
    PruneSpec,
    QuantScheme,
    QuantSpec,
    decode_prefix,
    decode_state,
    encode_state,
)
from fedsqueeze.codec.container import PROGRESSIVE_VERSION
from tests.codec.test_golden import _state

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
    spec, delta = CASES[name]
    return encode_state(_state(0), spec, _state(1) if delta else None, seed=0).to_bytes()


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_v2_bytes_unchanged(name: str) -> None:
    path = GOLDEN / f"{name}.fsq"
    assert path.exists(), f"missing golden vector {path}; see this module's docstring"
    expected = path.read_bytes()
    assert expected[3] == PROGRESSIVE_VERSION
    assert _encode(name) == expected, f"format v2 bytes changed for {name}"
    _spec, delta = CASES[name]
    base = _state(1) if delta else None
    decoded = decode_state(EncodedModel.from_bytes(expected), base)
    assert set(decoded) == set(_state(0))
    assert decode_prefix(expected[:-4], base).complete


def _regenerate() -> None:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for name in CASES:
        (GOLDEN / f"{name}.fsq").write_bytes(_encode(name))


if __name__ == "__main__":
    _regenerate()
    sys.exit(0)
