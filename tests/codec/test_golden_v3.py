"""Golden wire vectors of format version 3 (block-wise and NF4 quantization): bytes change
only with a format version bump.

Regenerate (only together with a format version change) with:
    python -m tests.codec.test_golden_v3
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedsqueeze.codec import EncodedModel, decode_prefix, decode_state, encode_state
from fedsqueeze.codec.container import BLOCKWISE_VERSION
from fedsqueeze.codec.spec_text import parse_spec
from tests.codec.test_golden import _state

GOLDEN = Path(__file__).parent.parent / "golden" / "v3"

CASES: dict[str, tuple[str, bool]] = {
    "block64-affine-8": ("quant=8:block64", False),
    "nf4-block64-dq": ("quant=4:nf4:block64:dq", False),
    "block32-symmetric-bf16-delta": ("quant=4:symmetric:block32:bf16", True),
    "nf4-channel-prune": ("prune=l1:0.5,quant=4:nf4:channel", False),
    "levels-block64-2+2+4": ("quant=8:block64,levels=2+2+4", False),
    "levels-nf4-2+2-delta": ("quant=4:nf4,levels=2+2", True),
}


def _encode(name: str) -> bytes:
    text, delta = CASES[name]
    return encode_state(
        _state(0), parse_spec(text), _state(1) if delta else None, seed=0
    ).to_bytes()


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_v3_bytes_unchanged(name: str) -> None:
    path = GOLDEN / f"{name}.fsq"
    assert path.exists(), f"missing golden vector {path}; see this module's docstring"
    expected = path.read_bytes()
    assert expected[3] == BLOCKWISE_VERSION
    assert _encode(name) == expected, f"format v3 bytes changed for {name}"
    _text, delta = CASES[name]
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
