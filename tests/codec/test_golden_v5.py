"""Golden wire vectors of format version 5 (refinements in one rate-distortion order over
all tensors): bytes change only with a format version bump.

Regenerate (only together with a format version change) with:
    python -m tests.codec.test_golden_v5
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fedsqueeze.codec import decode_prefix, encode_state
from fedsqueeze.codec.container import GLOBAL_ORDER_VERSION
from fedsqueeze.codec.spec_text import parse_spec
from tests.codec.test_golden import check_golden, regenerate

GOLDEN = Path(__file__).parent.parent / "golden" / "v5"

CASES: dict[str, tuple[str, bool]] = {
    "global-channel-1+1+2+4": ("quant=8:channel,levels=1+1+2+4", False),
    "global-block32-2+2+4-delta": ("quant=8:block32,levels=2+2+4", True),
    "global-nf4-1+1+2": ("quant=4:nf4:block32,levels=1+1+2", False),
}


def _state(seed: int) -> dict[str, torch.Tensor]:
    # Integers and exact binary fractions: identical on every platform. A small tensor
    # beside a large one, so that the small one's refinements come first.
    g = torch.Generator().manual_seed(seed)
    return {
        "small.weight": torch.randint(-64, 64, (4, 8), generator=g).float() / 32,
        "small.bias": torch.arange(4, dtype=torch.float32) / 4,
        "large.weight": torch.randint(-128, 128, (96, 128), generator=g).float() / 2048,
    }


def base_of(delta: bool) -> dict[str, torch.Tensor] | None:
    """The base a case is a delta against (``None``: a whole model)."""
    return _state(1) if delta else None


def encode_text_case(text: str, delta: bool) -> bytes:
    """``_state(0)`` under the spec ``text``, a delta against :func:`base_of` if ``delta``."""
    return encode_state(_state(0), parse_spec(text), base_of(delta), seed=0).to_bytes()


def _encode(name: str) -> bytes:
    return encode_text_case(*CASES[name])


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_v5_bytes_unchanged(name: str) -> None:
    base = base_of(CASES[name][1])
    encoded = _encode(name)
    decoded = check_golden(GOLDEN, name, encoded, GLOBAL_ORDER_VERSION, base)
    assert set(decoded) == set(_state(0))
    assert decode_prefix(encoded[:-4], base).complete


if __name__ == "__main__":
    regenerate(GOLDEN, CASES, _encode)
    sys.exit(0)
