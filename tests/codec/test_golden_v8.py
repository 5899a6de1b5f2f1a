"""Golden wire vectors of format version 8 (``entropy=ans``: adaptive rANS of dense
quantization codes where it beats zstandard): bytes change only with a format version
bump.

Regenerate (only together with a format version change) with:
    python -m tests.codec.test_golden_v8

The three low-rank vectors were written again (same format, same spec) when the encoder's
factorization moved to float64 with fixed signs: their float32 factors had depended on the
CPU's kernels, so the stored bytes did not reproduce on another Xeon. The vectors written
before stay in ``float32-factors/``: the v8 decoder must keep reading them, and they decode
to the same model within a quantization step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedsqueeze.codec import EncodedModel, decode_state
from fedsqueeze.codec.container import ANS_VERSION
from tests.codec.test_golden import check_golden, regenerate
from tests.codec.test_golden_v5 import _state, base_of, encode_text_case

GOLDEN = Path(__file__).parent.parent / "golden" / "v8"
EARLIER = GOLDEN / "float32-factors"

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


@pytest.mark.parametrize("name", sorted(p.stem for p in EARLIER.glob("*.fsq")))
def test_vectors_of_the_float32_factorization_still_decode(name: str) -> None:
    base = base_of(CASES[name][1])
    earlier = decode_state(EncodedModel.from_bytes((EARLIER / f"{name}.fsq").read_bytes()), base)
    now = decode_state(EncodedModel.from_bytes((GOLDEN / f"{name}.fsq").read_bytes()), base)
    assert set(earlier) == set(now)
    target = _state(0)
    for key, value in now.items():
        # The same spec on factors that differ by float32 rounding. The test matrices are
        # random, so their singular values are close and the factors can turn a little
        # within them; what must agree is how well each decode approximates the model.
        err_now = float((value - target[key]).norm())
        err_earlier = float((earlier[key] - target[key]).norm())
        assert abs(err_earlier - err_now) <= 0.01 * err_now + 1e-6, key


if __name__ == "__main__":
    regenerate(GOLDEN, CASES, _encode)
    sys.exit(0)
