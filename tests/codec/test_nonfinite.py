"""One policy for NaN/Inf on every encode path (issue 10, item 6), and the other input
checks of :func:`encode_state` (item 8): refuse by default naming the tensor, carry
losslessly on request."""

from __future__ import annotations

import pickle

import pytest
import torch

from edge.mod import fit_update
from fedsqueeze.codec import (
    CodecSpec,
    EncodedModel,
    NonFinite,
    decode_state,
    encode_state,
    state_digest,
)
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.errors import (
    BaseMismatchError,
    CodecWarning,
    ConfigError,
    NonFiniteError,
    UnsupportedTensorError,
)

#: One spec per encode path: lossless, casts, int8 per tensor and per channel, sub-byte,
#: k-means, every pruning method, top-k (with and without quantization), low-rank.
SPECS = [
    "lossless",
    "fp16",
    "float=bf16,targets=*,min-ndim=0",
    "int8",
    "quant=8:channel,targets=*,min-ndim=1",
    "int4",
    "quant=2:symmetric,targets=*,min-ndim=1",
    "quant=4:pow2",
    "quant=3:kmeans,targets=*,min-ndim=1",
    "prune=l1:0.5,quant=4",
    "prune=global:0.5,targets=*,min-ndim=1",
    "prune95-kmeans3",
    "prune=channel:0.25",
    "prune=threshold:0.1,quant=8",
    "topk10-int4",
    "topk=0.5,targets=*,min-ndim=1",
    "topk=0.5,float=fp16,targets=*,min-ndim=1",
    "rank=2,targets=*,min-ndim=1",
    "rank=1,quant=4,targets=*,min-ndim=1",
    "rank=2,float=bf16",
]

BAD = [
    ("fc.weight", (1, 3), float("nan")),
    ("fc.weight", (0, 0), float("-inf")),
    ("fc.bias", (2,), float("inf")),
]


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fc.weight": torch.randn(16, 32, generator=g),
        "fc.bias": torch.randn(16, generator=g),
        "steps": torch.tensor(5, dtype=torch.int64),
    }


def _with(
    state: dict[str, torch.Tensor], name: str, at: tuple[int, ...], value: float
) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in state.items()}
    out[name][at] = value
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


@pytest.mark.parametrize("delta", [False, True], ids=["full", "delta"])
@pytest.mark.parametrize(
    ("name", "at", "value"), BAD, ids=["nan-weight", "-inf-weight", "inf-bias"]
)
@pytest.mark.parametrize("text", SPECS)
def test_refused_by_default_naming_the_tensor(
    text: str, name: str, at: tuple[int, ...], value: float, delta: bool
) -> None:
    spec = parse_spec(text)
    state = _with(_state(1), name, at, value)
    base = _state(0) if delta else None
    with pytest.raises(NonFiniteError) as exc:
        encode_state(state, spec, base, seed=0)
    assert exc.value.tensor == name and repr(name) in str(exc.value)
    assert isinstance(exc.value, ValueError)  # a caller's mistake too, as STYLE says


@pytest.mark.parametrize("delta", [False, True], ids=["full", "delta"])
@pytest.mark.parametrize(
    ("name", "at", "value"), BAD, ids=["nan-weight", "-inf-weight", "inf-bias"]
)
@pytest.mark.parametrize("text", SPECS)
def test_carried_bit_exactly_on_request(
    text: str, name: str, at: tuple[int, ...], value: float, delta: bool
) -> None:
    spec = parse_spec(text)
    state = _with(_state(1), name, at, value)
    base = _state(0) if delta else None
    residual = {name: torch.full_like(state[name], 0.5)} if spec.feedback else None
    encoded = encode_state(state, spec, base, residual=residual, seed=0, nonfinite=NonFinite.CARRY)
    decoded = decode_state(EncodedModel.from_bytes(encoded.to_bytes()), base)
    assert torch.equal(_bits(decoded[name]), _bits(state[name]))
    for other, t in decoded.items():
        if other != name and t.is_floating_point():
            assert bool(torch.isfinite(t).all()), other
    if spec.feedback:
        assert encoded.residual is not None
        assert all(bool(torch.isfinite(r).all()) for r in encoded.residual.values())
        # the carried tensor sent nothing of its residual: it is still owed
        assert torch.equal(encoded.residual[name], residual[name])  # type: ignore[index]


@pytest.mark.parametrize("text", ["int8", "topk=0.5,targets=*,min-ndim=1", "rank=2,targets=*"])
def test_a_nonfinite_base_is_named_as_such(text: str) -> None:
    base = _with(_state(0), "fc.weight", (2, 2), float("nan"))
    state = _state(1)
    with pytest.raises(NonFiniteError, match="difference to the base"):
        encode_state(state, parse_spec(text), base)
    encoded = encode_state(state, parse_spec(text), base, nonfinite=NonFinite.CARRY)
    decoded = decode_state(encoded, base)
    assert torch.equal(decoded["fc.weight"], state["fc.weight"])


def test_lossless_delta_against_a_nonfinite_base_needs_no_carrying() -> None:
    # XOR of the bits is exact whatever the base holds
    base = _with(_state(0), "fc.weight", (2, 2), float("nan"))
    state = _state(1)
    assert torch.equal(decode_state(encode_state(state, CodecSpec(), base), base)["fc.weight"],
                       state["fc.weight"])  # fmt: skip


@pytest.mark.parametrize("text", ["fp16", "float=bf16,targets=*,min-ndim=0", "topk=1.0,float=fp16"])
def test_values_beyond_the_cast_format_are_refused_or_carried(text: str) -> None:
    big = 1e6 if "fp16" in text else 3e38 * 1.1  # bf16 rounds 3.3e38 up to Inf
    state = {"fc.weight": torch.full((4, 4), big), "fc.bias": torch.ones(4)}
    if "bf16" in text:
        state["fc.weight"] = torch.full((4, 4), torch.finfo(torch.float32).max)
    with pytest.raises(NonFiniteError, match="beyond the range"):
        encode_state(state, parse_spec(text))
    encoded = encode_state(state, parse_spec(text), nonfinite=NonFinite.CARRY)
    assert torch.equal(decode_state(encoded)["fc.weight"], state["fc.weight"])


def test_values_too_large_to_quantize() -> None:
    state = {"fc.weight": torch.tensor([[1.0, 2.0**127]])}
    with pytest.raises(NonFiniteError, match="too large to quantize"):
        encode_state(state, parse_spec("int8"))
    encoded = encode_state(state, parse_spec("int8"), nonfinite=NonFinite.CARRY)
    assert torch.equal(decode_state(encoded)["fc.weight"], state["fc.weight"])


def test_finite_states_encode_as_before() -> None:
    state, base = _state(1), _state(0)
    for text in SPECS:
        spec = parse_spec(text)
        a = encode_state(state, spec, base, seed=0)
        b = encode_state(state, spec, base, seed=0, nonfinite=NonFinite.CARRY)
        assert a.to_bytes() == b.to_bytes(), text


def test_policy_must_be_the_enum() -> None:
    with pytest.raises(TypeError):
        encode_state(_state(), CodecSpec(), nonfinite="carry")  # type: ignore[arg-type]


def test_error_survives_pickling() -> None:
    err = NonFiniteError("w", "tensor 'w' has 1 NaN value", "advice")
    back = pickle.loads(pickle.dumps(err))
    assert (back.tensor, back.reason, str(back)) == ("w", err.reason, str(err))


# --------------------------------------------------------------------- edge updates
def test_edge_update_refuses_nonfinite_and_carries_on_request() -> None:
    held = _state(0)
    trained = _with(_state(1), "fc.weight", (0, 1), float("nan"))
    spec, digest = parse_spec("topk10-int4"), state_digest(held)
    with pytest.raises(NonFiniteError, match=r"'fc\.weight'"):
        fit_update(trained, spec, held, residual=None, seed=1, base_digest=digest)
    encoded = fit_update(
        trained, spec, held, residual=None, seed=1, base_digest=digest, nonfinite=NonFinite.CARRY
    )
    got = decode_state(encoded, held)["fc.weight"]
    assert torch.equal(_bits(got), _bits(trained["fc.weight"]))


def test_edge_low_rank_update_under_a_budget_refuses_nonfinite() -> None:
    held = _state(0)
    trained = _with(_state(1), "fc.bias", (3,), float("inf"))
    with pytest.raises(NonFiniteError, match=r"'fc\.bias'"):
        fit_update(
            trained,
            parse_spec("rank=8,quant=4,targets=*,min-ndim=1"),
            held,
            residual=None,
            seed=0,
            base_digest=state_digest(held),
            budget=200,
        )


# ------------------------------------------------------------- other input checks
def test_complex_tensors_are_refused_as_codec_and_type_errors() -> None:
    state = {"z": torch.ones(3, dtype=torch.complex64)}
    with pytest.raises(UnsupportedTensorError, match="'z' is complex"):
        encode_state(state, CodecSpec())
    with pytest.raises(TypeError):
        encode_state(state, CodecSpec())


def test_a_base_sharing_no_tensor_is_refused() -> None:
    state = _state()
    with pytest.raises(BaseMismatchError, match="shares no tensor"):
        encode_state(state, CodecSpec(), {"other": torch.zeros(3)})
    with pytest.raises(BaseMismatchError):  # same names, other shapes and dtypes
        encode_state(state, CodecSpec(), {k: torch.zeros(1, dtype=torch.int8) for k in state})
    with pytest.raises(BaseMismatchError):
        encode_state(state, CodecSpec(), {})
    partial = {"fc.bias": torch.zeros(16)}  # one shared tensor is a base
    decoded = decode_state(encode_state(state, CodecSpec(), partial), partial)
    assert all(torch.equal(decoded[k], v) for k, v in state.items())


def test_targets_matching_nothing_warn() -> None:
    spec = parse_spec("int8,targets=conv*|fc.*")
    with pytest.warns(CodecWarning, match="'conv\\*' matches no tensor"):
        encode_state(_state(), spec)


def test_default_targets_and_empty_states_do_not_warn() -> None:
    # pytest turns warnings into errors: these must stay silent
    encode_state({"x": torch.ones(2, 2)}, parse_spec("int4"))
    encode_state({}, parse_spec("int8,targets=conv*"))


def test_duplicate_spec_keys_are_refused_but_preset_overrides_are_not() -> None:
    with pytest.raises(ConfigError, match="'quant' twice"):
        parse_spec("quant=8,quant=4")
    with pytest.raises(ConfigError, match="'entropy' twice"):
        parse_spec("int4,entropy=3,entropy=5")
    assert parse_spec("int4,quant=8").quant == parse_spec("int8").quant


@pytest.mark.parametrize(
    ("text", "wanted"),
    [("entropy=99", "entropy must be a zstd level in 0..22"), ("min-ndim=-1", "min-ndim must be")],
)
def test_spec_range_errors_name_the_key_not_the_field(text: str, wanted: str) -> None:
    with pytest.raises(ConfigError, match=wanted) as exc:
        parse_spec(text)
    assert "entropy_level" not in str(exc.value) and "min_ndim" not in str(exc.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("jit_on", [True, False])
def test_the_bit_test_of_finiteness_agrees_with_torch_on_large_tensors(
    dtype: torch.dtype, jit_on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsqueeze.codec import jit
    from fedsqueeze.codec.finite import all_finite

    if not jit_on:
        monkeypatch.setattr(jit, "ENABLED", False)
        monkeypatch.setattr(jit, "_compiled", None)
    n = (1 << 20) + 3 * (1 << 16) + 11  # two chunks of the compiled path, the second short
    x = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[7] = torch.finfo(dtype).max  # the largest finite magnitudes are finite
    x[8] = -torch.finfo(dtype).max
    x[9] = -0.0
    x[10] = torch.finfo(dtype).tiny / 4  # a subnormal
    assert all_finite(x) and all_finite(x.reshape(-1, 5)[:, 1:].t())  # strided too
    for at in (0, n // 2, (1 << 20) + 17, n - 1):
        for bad in (float("nan"), float("inf"), float("-inf")):
            y = x.clone()
            y[at] = bad
            assert not all_finite(y), (at, bad)
    # and the encoder's own check, on the lossless path
    y = x.clone()
    y[n - 1] = float("nan")
    with pytest.raises(NonFiniteError, match="w"):
        encode_state({"w": y}, parse_spec("lossless"))
