"""Golden wire vectors of format version 6 (values rotated before quantization, with the
seed in each record): bytes change only with a format version bump.

Regenerate (only together with a format version change) with:
    python -m tests.codec.test_golden_v6
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fedsqueeze.codec import decode_prefix, decode_state, encode_state
from fedsqueeze.codec.container import ROTATED_VERSION
from fedsqueeze.codec.level_order import LevelOrder
from fedsqueeze.codec.spec_text import parse_spec
from tests.codec.test_golden import check_golden, regenerate

GOLDEN = Path(__file__).parent.parent / "golden" / "v6"

#: name → (spec, delta, weighted order)
CASES: dict[str, tuple[str, bool, bool]] = {
    "hadamard-channel-2+1+1+2+2-weighted": (
        "quant=8:channel:hadamard,levels=2+1+1+2+2",
        False,
        True,
    ),
    "hadamard-block32-dq-delta": ("quant=4:block32:dq:hadamard", True, False),
    "hadamard-tensor-8": ("quant=8:hadamard", False, False),
    "hadamard-nf4-block32-2+2-delta": ("quant=4:nf4:block32:hadamard,levels=2+2", True, False),
}
#: the weighted case's sensitivities (the decoder never sees them)
WEIGHTS = {"small.weight": 0.5, "large.weight": 2.0}


def _state(seed: int) -> dict[str, torch.Tensor]:
    # Integers and exact binary fractions: identical on every platform; rows of 24 values
    # (Hadamard blocks of 8) with an outlier column.
    g = torch.Generator().manual_seed(seed)
    large = torch.randint(-128, 128, (40, 24), generator=g).float() / 2048
    large[:, 3] *= 16
    return {
        "small.weight": torch.randint(-64, 64, (4, 8), generator=g).float() / 32,
        "small.bias": torch.arange(4, dtype=torch.float32) / 4,
        "large.weight": large,
    }


def _encode(name: str) -> bytes:
    text, delta, weighted = CASES[name]
    base = _state(1) if delta else None
    order = LevelOrder.WEIGHTED if weighted else LevelOrder.RELATIVE
    weights = WEIGHTS if weighted else None
    return encode_state(
        _state(0), parse_spec(text), base, seed=0, order=order, weights=weights
    ).to_bytes()


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_v6_bytes_unchanged(name: str) -> None:
    text, delta, _weighted = CASES[name]
    base = _state(1) if delta else None
    encoded = _encode(name)
    decoded = check_golden(GOLDEN, name, encoded, ROTATED_VERSION, base)
    assert set(decoded) == set(_state(0))
    assert decode_prefix(encoded[:-4], base).complete
    # the rotation is undone: close to the input, as an unrotated encoding is
    unrotated = parse_spec(text.replace(":hadamard", ""))
    plain = decode_state(encode_state(_state(0), unrotated, base), base)
    for key, value in _state(0).items():
        rotated_err = float((decoded[key] - value).norm())
        plain_err = float((plain[key] - value).norm())
        assert rotated_err <= 2 * plain_err + 1e-6, key


if __name__ == "__main__":
    regenerate(GOLDEN, CASES, _encode)
    sys.exit(0)
