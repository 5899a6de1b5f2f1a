"""Golden wire vectors of format version 9 (``entropy=ans`` with levels: refinement
planes ANS-coded with the coarser code bits as context where that beats zstandard):
bytes change only with a format version bump.

Regenerate (only together with a format version change) with:
    python -m tests.codec.test_golden_v9
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedsqueeze.codec import EncodedModel, decode_prefix
from fedsqueeze.codec.container import PLANE_ANS_VERSION
from tests.codec.test_golden import check_golden, regenerate
from tests.codec.test_golden_v5 import _state, base_of, encode_text_case

GOLDEN = Path(__file__).parent.parent / "golden" / "v9"

CASES: dict[str, tuple[str, bool]] = {
    "grow-global-symmetric-1+1+2-ans": (
        "prune=global:0.8,quant=4:symmetric,levels=1+1+2,float=fp16,grow=0.9,entropy=ans",
        False,
    ),
    "channel-2+2+4-ans-delta": ("quant=8:channel,levels=2+2+4,entropy=ans", True),
    "kmeans-l1-2+2-ans": ("prune=l1:0.7,quant=4:kmeans,levels=2+2,entropy=ans:3", False),
}


def _encode(name: str) -> bytes:
    return encode_text_case(*CASES[name])


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_v9_bytes_unchanged(name: str) -> None:
    base = base_of(CASES[name][1])
    encoded = _encode(name)
    decoded = check_golden(GOLDEN, name, encoded, PLANE_ANS_VERSION, base)
    assert set(decoded) == set(_state(0))
    assert any(r.ans and r.level > 0 for r in EncodedModel.from_bytes(encoded).records)
    assert decode_prefix(encoded[:-4], base).complete


if __name__ == "__main__":
    regenerate(GOLDEN, CASES, _encode)
    sys.exit(0)
