"""CodecSpec validation, its byte form and its text form."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.codec import (
    PRESETS,
    CodecSpec,
    FloatFormat,
    Granularity,
    PruneMethod,
    PruneSpec,
    QuantScheme,
    QuantSpec,
    Rounding,
    ScaleFormat,
    preset,
)
from fedsqueeze.codec.spec_text import format_spec, parse_spec
from fedsqueeze.errors import ConfigError, FormatError


@st.composite
def specs(draw: st.DrawFn) -> CodecSpec:
    method = draw(st.sampled_from(list(PruneMethod)))
    sparsity = draw(st.floats(0.0, 0.99))
    prune = PruneSpec(method, sparsity, draw(st.floats(0.0, 10.0)))
    topk = None if prune.active else draw(st.none() | st.floats(0.01, 1.0))
    quant = None
    if draw(st.booleans()):
        scheme = draw(st.sampled_from(list(QuantScheme)))
        gran = (
            Granularity.PER_TENSOR
            if scheme is QuantScheme.KMEANS
            else draw(st.sampled_from(list(Granularity)))
        )
        blocked = gran is Granularity.PER_BLOCK
        quant = QuantSpec(
            4 if scheme is QuantScheme.NF4 else draw(st.sampled_from([2, 3, 4, 8])),
            scheme,
            gran,
            draw(st.sampled_from(list(Rounding))),
            draw(st.integers(32, 4096)) if blocked else None,
            draw(st.sampled_from(list(ScaleFormat))) if blocked else None,
        )
    rank = None
    if (
        topk is None
        and not prune.active
        and (quant is None or quant.granularity is Granularity.PER_TENSOR)
    ):
        rank = draw(st.none() | st.integers(1, 1024))
    targets = draw(st.sampled_from([("*weight",), ("*",), ("fc*", "conv*.weight")]))
    return CodecSpec(
        prune=prune,
        topk=topk,
        quant=quant,
        float_format=draw(st.sampled_from(list(FloatFormat))),
        entropy_level=draw(st.integers(0, 22)),
        targets=targets,
        min_ndim=draw(st.integers(0, 4)),
        rank=rank,
    )


@given(specs())
@settings(max_examples=200, deadline=None)
def test_spec_bytes_round_trip(spec: CodecSpec) -> None:
    assert CodecSpec.from_bytes(spec.to_bytes()) == spec


@given(specs())
@settings(max_examples=200, deadline=None)
def test_spec_text_round_trip(spec: CodecSpec) -> None:
    assert parse_spec(format_spec(spec)) == spec


def test_default_spec_is_compact() -> None:
    assert len(CodecSpec().to_bytes()) <= 4
    assert len(PRESETS["prune95-kmeans3"].to_bytes()) <= 16


@given(st.binary(max_size=64))
@settings(max_examples=500, deadline=None)
def test_spec_from_garbage_raises_format_error(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        CodecSpec.from_bytes(data)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"topk": 0.0},
        {"topk": 1.5},
        {"entropy_level": 23},
        {"targets": ()},
        {"topk": 0.1, "prune": PruneSpec(PruneMethod.L1_UNSTRUCTURED, 0.5)},
    ],
)
def test_invalid_specs_are_value_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        CodecSpec(**kwargs)  # type: ignore[arg-type]


def test_invalid_parts() -> None:
    with pytest.raises(ValueError):
        PruneSpec(PruneMethod.L1_UNSTRUCTURED, 1.0)
    with pytest.raises(ValueError):
        QuantSpec(5)
    with pytest.raises(ValueError):
        QuantSpec(4, QuantScheme.KMEANS, Granularity.PER_CHANNEL)


def test_text_form_examples_and_errors() -> None:
    spec = parse_spec("prune=global:0.95,quant=3:kmeans,entropy=19")
    assert spec.prune == PruneSpec(PruneMethod.L1_GLOBAL, 0.95)
    assert spec.quant == QuantSpec(3, QuantScheme.KMEANS)
    assert spec.entropy_level == 19
    assert parse_spec("int4,entropy=0") == PRESETS["int4"].with_changes(entropy_level=0)
    for bad in ["", "nosuchpreset", "prune=l1", "quant=5", "quant=4:fancy", "color=red", "topk=x"]:
        with pytest.raises(ConfigError):
            parse_spec(bad)
    with pytest.raises(ConfigError):
        preset("nope")
    assert preset("int8") == PRESETS["int8"]
