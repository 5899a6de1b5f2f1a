"""Finiteness checked by the lossless coder on the way (fp32 and bf16 values sent whole):
``encode_grouped(finite=True)`` raises exactly when a NaN or an Inf is among the values,
on every path a chunk takes (joint planes from the words, split planes, the NumPy
path), and :func:`encode_state` refuses or carries such a tensor as its own check did,
naming the first one in order."""

from __future__ import annotations

import pytest
import torch

from fedsqueeze.codec import NonFinite, decode_state, encode_state, jit
from fedsqueeze.codec.grouping import NonFiniteFound, encode_grouped
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.codec.tensor_encode import TensorEncoder
from fedsqueeze.errors import NonFiniteError

SWAPPED = [torch.float32, torch.bfloat16]
BAD = [float("nan"), float("inf"), -float("inf")]
#: Values per tensor: one chunk coded jointly from the words (> 64K values), one of
#: split planes (<= 64K), and three chunks of 2^17 (the bad value in any of them).
SIZES = [70_001, 5_000, 3 * (1 << 17) + 11]


def _weights(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.05).to(dtype)


@pytest.mark.parametrize("dtype", SWAPPED)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("compiled", [True, False])
def test_encode_grouped_raises_exactly_for_a_nan_or_inf(
    dtype: torch.dtype, n: int, compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jit, "ENABLED", compiled)
    x = _weights(n, dtype, seed=n)
    x[-1] = torch.finfo(dtype).max  # the largest finite value is not refused
    x[0] = -torch.finfo(dtype).max
    plain = bytes(encode_grouped(x, dtype, 17))
    assert bytes(encode_grouped(x, dtype, 17, finite=True)) == plain  # nothing else changes
    g = torch.Generator().manual_seed(n)
    for bad in BAD:
        at = int(torch.randint(0, n, (1,), generator=g))
        y = x.clone()
        y[at] = bad
        with pytest.raises(NonFiniteFound):
            encode_grouped(y, dtype, 17, finite=True)
        encode_grouped(y, dtype, 17)  # unchecked, it is coded (bit-exactly) as before


def test_encode_grouped_checks_only_fp32_and_bf16_whole() -> None:
    x = _weights(1000, torch.float32)
    with pytest.raises(ValueError, match="fp32 and bf16"):
        encode_grouped(x.half(), torch.float16, finite=True)
    with pytest.raises(ValueError, match="no base"):
        encode_grouped(x, torch.float32, base=x.clone(), finite=True)


@pytest.mark.parametrize("dtype", SWAPPED)
@pytest.mark.parametrize("n", [10, *SIZES])
@pytest.mark.parametrize("bad", BAD)
def test_a_nonfinite_lossless_tensor_is_refused_or_carried(
    dtype: torch.dtype, n: int, bad: float
) -> None:
    """The refusal names the tensor as the encoder's own check did; carried, the tensor
    decodes bit-exactly; every other tensor is unchanged."""
    state = {"a": _weights(n, dtype, 1), "b": _weights(n, dtype, 2), "c": _weights(300, dtype, 3)}
    state["b"][n // 2] = bad
    spec = parse_spec("lossless")
    with pytest.raises(NonFiniteError) as exc:
        encode_state(state, spec)
    assert exc.value.tensor == "b"
    assert str(exc.value) == str(NonFiniteError("b", _own_check(state["b"])))
    decoded = decode_state(encode_state(state, spec, nonfinite=NonFinite.CARRY))
    for name, t in state.items():
        assert torch.equal(decoded[name].view(torch.int16 if dtype.itemsize == 2 else torch.int32),
                           t.view(torch.int16 if dtype.itemsize == 2 else torch.int32))  # fmt: skip


def _own_check(t: torch.Tensor) -> str:
    """The problem the encoder's separate check finds in tensor ``b``."""
    problem = TensorEncoder(parse_spec("lossless"), None, None, None).problem("b", t)
    assert problem is not None
    return problem


@pytest.mark.parametrize("dtype", [*SWAPPED, torch.float16])
def test_the_first_bad_tensor_in_order_is_named(dtype: torch.dtype) -> None:
    """Tensors are checked on the worker threads; the refusal still names the first bad
    one in the state's order, large (coded alone) or small."""
    names = [f"t{i}" for i in range(8)]
    sizes = [200_000 if i % 3 == 0 else 4_000 for i in range(8)]
    for first in (1, 3, 6):
        state = {
            nm: _weights(s, dtype, i) for i, (nm, s) in enumerate(zip(names, sizes, strict=True))
        }
        for later in range(first, 8, 2):
            state[names[later]][7] = float("nan")
        with pytest.raises(NonFiniteError) as exc:
            encode_state(state, parse_spec("lossless"))
        assert exc.value.tensor == names[first]
