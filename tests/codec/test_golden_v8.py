"""Golden wire vectors of format version 8 (``entropy=ans``: adaptive rANS of dense
quantization codes where it beats zstandard): bytes change only with a format version
bump.

Regenerate (only together with a format version change) with:
    python -m tests.codec.test_golden_v8
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedsqueeze.codec import EncodedModel
from fedsqueeze.codec.container import ANS_VERSION
from tests.codec.test_golden import check_golden, regenerate
from tests.codec.test_golden_v5 import _state, base_of, encode_text_case

GOLDEN = Path(__file__).parent.parent / "golden" / "v8"

CASES: dict[str, tuple[str, bool]] = {
    "lowrank-4bit-ans-delta": ("rank=4,quant=4,entropy=ans,targets=*,min-ndim=1", True),
    "lowrank-8bit-symmetric-ans": ("rank=8,quant=8:symmetric,entropy=ans:3", False),
    "lowrank-3bit-ans": ("rank=16,quant=3,entropy=ans", False),
    "dense-kmeans-4bit-ans-delta": ("quant=4:kmeans,entropy=ans", True),
}


def _encode(name: str) -> bytes:
    return encode_text_case(*CASES[name])


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_v8_bytes_unchanged(name: str) -> None:
    base = base_of(CASES[name][1])
    encoded = _encode(name)
    decoded = check_golden(GOLDEN, name, encoded, ANS_VERSION, base)
    assert set(decoded) == set(_state(0))
    assert any(r.ans for r in EncodedModel.from_bytes(encoded).records)


if __name__ == "__main__":
    regenerate(GOLDEN, CASES, _encode)
    sys.exit(0)
