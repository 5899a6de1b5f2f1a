"""Golden wire vectors: format v1's bytes may change only with a format version bump.

Regenerate (only together with a FORMAT_VERSION change) with:
    python -m tests.codec.test_golden

Streams an earlier encoder wrote (the same format, other choices) are kept under
``tests/golden/archive/`` with what they decode to (``test_golden_archive.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pytest
import torch

from fedsqueeze.codec import (
    CodecSpec,
    EncodedModel,
    Granularity,
    PruneMethod,
    PruneSpec,
    QuantScheme,
    QuantSpec,
    Rounding,
    decode_state,
    encode_state,
)
from fedsqueeze.codec.container import FORMAT_VERSION
from fedsqueeze.codec.level_order import LevelOrder

GOLDEN = Path(__file__).parent.parent / "golden" / "v1"


def _state(seed: int) -> dict[str, torch.Tensor]:
    # Values built from integers and exact binary fractions: identical on every platform.
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-64, 64, (6, 2, 3, 3), generator=g).float() / 32
    return {
        "conv.weight": w,
        "conv.bias": torch.arange(6, dtype=torch.float32) / 8,
        "fc.weight": torch.randint(-128, 128, (4, 24), generator=g).float() / 64,
        "steps": torch.tensor(42, dtype=torch.int64),
    }


CASES: dict[str, tuple[CodecSpec, bool]] = {
    "lossless": (CodecSpec(), False),
    "lossless-delta": (CodecSpec(), True),
    "int8-affine": (CodecSpec(quant=QuantSpec(8)), False),
    "int4-symmetric-channel": (
        CodecSpec(quant=QuantSpec(4, QuantScheme.SYMMETRIC, Granularity.PER_CHANNEL)),
        False,
    ),
    "pow2-2bit": (CodecSpec(quant=QuantSpec(2, QuantScheme.POW2)), False),
    "prune-l1-3bit": (
        CodecSpec(prune=PruneSpec(PruneMethod.L1_UNSTRUCTURED, 0.7), quant=QuantSpec(3)),
        False,
    ),
    "prune-channel": (CodecSpec(prune=PruneSpec(PruneMethod.LN_STRUCTURED, 0.5)), False),
    "topk-delta": (
        CodecSpec(
            topk=0.25, quant=QuantSpec(4, rounding=Rounding.NEAREST), targets=("*",), min_ndim=1
        ),
        True,
    ),
    "fp16-entropy-off": (
        CodecSpec(
            float_format=__import__("fedsqueeze.codec", fromlist=["FloatFormat"]).FloatFormat.FP16,
            entropy_level=0,
            targets=("*",),
            min_ndim=0,
        ),
        False,
    ),
}


def encode_case(spec: CodecSpec, delta: bool, order: LevelOrder = LevelOrder.BY_LEVEL) -> bytes:
    """The golden encoding of ``_state(0)`` (against ``_state(1)`` for a delta); levels
    in the order of versions 2-4 unless ``order`` says otherwise."""
    base = _state(1) if delta else None
    return encode_state(_state(0), spec, base, seed=0, order=order).to_bytes()


def check_golden(
    directory: Path,
    name: str,
    encoded: bytes,
    version: int,
    base: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """Assert that ``encoded`` is the stored vector ``name`` of format ``version``, and
    return what the stored bytes decode to (against ``base``)."""
    path = directory / f"{name}.fsq"
    assert path.exists(), f"missing golden vector {path}; see the test module's docstring"
    expected = path.read_bytes()
    assert expected[3] == version
    assert encoded == expected, f"format v{version} bytes changed for {name}"
    return decode_state(EncodedModel.from_bytes(expected), base)


def regenerate(directory: Path, names: Iterable[str], encode: Callable[[str], bytes]) -> None:
    """Rewrite the golden vectors ``names`` (only together with a format version bump)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / f"{name}.fsq").write_bytes(encode(name))


def _encode(name: str) -> bytes:
    return encode_case(*CASES[name])


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_bytes_unchanged(name: str) -> None:
    _spec, delta = CASES[name]
    decoded = check_golden(
        GOLDEN, name, _encode(name), FORMAT_VERSION, _state(1) if delta else None
    )
    assert set(decoded) == set(_state(0))


if __name__ == "__main__":
    regenerate(GOLDEN, CASES, _encode)
    sys.exit(0)
