"""Golden wire vectors of format version 3 (block-wise and NF4 quantization): bytes change
only with a format version bump.

Regenerate (only together with a format version change) with:
    python -m tests.codec.test_golden_v3
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedsqueeze.codec import decode_prefix
from fedsqueeze.codec.container import BLOCKWISE_VERSION
from fedsqueeze.codec.spec_text import parse_spec
from tests.codec.test_golden import _state, check_golden, encode_case, regenerate

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
    return encode_case(parse_spec(text), delta)


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_v3_bytes_unchanged(name: str) -> None:
    _text, delta = CASES[name]
    base = _state(1) if delta else None
    encoded = _encode(name)
    decoded = check_golden(GOLDEN, name, encoded, BLOCKWISE_VERSION, base)
    assert set(decoded) == set(_state(0))
    assert decode_prefix(encoded[:-4], base).complete


if __name__ == "__main__":
    regenerate(GOLDEN, CASES, _encode)
    sys.exit(0)
