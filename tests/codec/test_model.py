"""encode_state / decode_state: round trips, deltas, error feedback and bad input."""

from __future__ import annotations

import pytest
import torch

from fedsqueeze.codec import (
    CodecSpec,
    EncodedModel,
    FloatFormat,
    Granularity,
    PruneMethod,
    PruneSpec,
    QuantScheme,
    QuantSpec,
    Rounding,
    decode_state,
    encode_state,
    state_digest,
)
from fedsqueeze.errors import BaseMismatchError, CodecError
from tests.codec.conftest import make_state


def _assert_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def test_lossless_round_trip_is_bit_exact(state: dict[str, torch.Tensor]) -> None:
    encoded = encode_state(state, CodecSpec())
    decoded = decode_state(EncodedModel.from_bytes(encoded.to_bytes()))
    _assert_bit_exact(state, decoded)
    assert state_digest(decoded) == state_digest(state)


def test_lossless_delta_round_trip_is_bit_exact(state: dict[str, torch.Tensor]) -> None:
    base = make_state(1)
    new = {
        k: (v + 1e-3 * torch.randn_like(v) if v.is_floating_point() else v)
        for k, v in state.items()
    }
    encoded = encode_state(new, CodecSpec(), base)
    assert encoded.base_digest == state_digest(base)
    decoded = decode_state(EncodedModel.from_bytes(encoded.to_bytes()), base)
    _assert_bit_exact(new, decoded)


def test_delta_against_near_identical_base_is_small(state: dict[str, torch.Tensor]) -> None:
    full = encode_state(state, CodecSpec()).nbytes
    delta = encode_state(state, CodecSpec(), state).nbytes
    assert delta < full / 10


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(
    ("scheme", "granularity"),
    [
        (s, g)
        for s in QuantScheme
        for g in (Granularity.PER_TENSOR, Granularity.PER_CHANNEL)
        # one codebook per tensor; NF4 and blocks: tests/codec/test_blockwise.py
        if not (s is QuantScheme.KMEANS and g is Granularity.PER_CHANNEL)
        and s is not QuantScheme.NF4
    ],
)
def test_quantized_round_trip_error_bounded(
    state: dict[str, torch.Tensor], bits: int, scheme: QuantScheme, granularity: Granularity
) -> None:
    spec = CodecSpec(quant=QuantSpec(bits, scheme, granularity))
    decoded = decode_state(EncodedModel.from_bytes(encode_state(state, spec).to_bytes()))
    w = state["fc1.weight"]
    err = (decoded["fc1.weight"] - w).abs().max().item()
    span = (w.clamp(min=0).max() - w.clamp(max=0).min()).item()
    half_step = {
        QuantScheme.AFFINE: span / (2**bits - 1) / 2,
        QuantScheme.SYMMETRIC: w.abs().max().item() / (2 ** (bits - 1) - 1) / 2,
        QuantScheme.POW2: w.abs().max().item() / (2 ** (bits - 1) - 1),  # scale rounded up ≤ 2×
        QuantScheme.KMEANS: span / 2,
    }[scheme]
    assert err <= half_step * (1 + 1e-5) + 1e-7
    # non-targets (biases, buffers) stay exact
    for name in ("conv1.bias", "fc1.bias", "bn.num_batches_tracked", "flags"):
        assert torch.equal(decoded[name], state[name])


def test_pruning_keeps_exact_count_and_zeros_the_rest(state: dict[str, torch.Tensor]) -> None:
    spec = CodecSpec(prune=PruneSpec(PruneMethod.L1_UNSTRUCTURED, 0.75))
    decoded = decode_state(EncodedModel.from_bytes(encode_state(state, spec).to_bytes()))
    w = decoded["fc1.weight"]
    assert int((w != 0).sum()) == w.numel() - round(0.75 * w.numel())
    kept = w != 0
    assert torch.equal(w[kept], state["fc1.weight"][kept])


def test_global_pruning_and_kmeans_compresses_hard(state: dict[str, torch.Tensor]) -> None:
    spec = CodecSpec(
        prune=PruneSpec(PruneMethod.L1_GLOBAL, 0.9), quant=QuantSpec(3, QuantScheme.KMEANS)
    )
    encoded = encode_state(state, spec)
    raw = sum(t.numel() * t.element_size() for t in state.values())
    assert encoded.nbytes < raw / 4
    decode_state(EncodedModel.from_bytes(encoded.to_bytes()))


def test_fp16_and_bf16_float_formats(state: dict[str, torch.Tensor]) -> None:
    for fmt in (FloatFormat.FP16, FloatFormat.BF16):
        spec = CodecSpec(float_format=fmt, targets=("*",), min_ndim=0)
        decoded = decode_state(EncodedModel.from_bytes(encode_state(state, spec).to_bytes()))
        tol = 1e-2 if fmt is FloatFormat.BF16 else 1e-3
        for name, t in state.items():
            assert decoded[name].dtype == t.dtype
            if t.is_floating_point():
                assert torch.allclose(decoded[name].float(), t.float(), rtol=tol, atol=tol)


def test_topk_error_feedback_residual_accounts_for_everything() -> None:
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}
    new = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    spec = CodecSpec(
        topk=0.1, quant=QuantSpec(4, rounding=Rounding.STOCHASTIC), targets=("*",), min_ndim=1
    )
    encoded = encode_state(new, spec, base, seed=1)
    assert encoded.residual is not None
    decoded = decode_state(EncodedModel.from_bytes(encoded.to_bytes()), base)
    for name in base:
        sent = decoded[name] - base[name]
        true_delta = new[name] - base[name]
        # what was sent plus what is kept back is exactly the true delta
        assert torch.allclose(sent + encoded.residual[name], true_delta, atol=1e-5)
        assert int((sent != 0).sum()) <= round(0.1 * sent.numel()) + 1
    # the residual is fed back: the next round sends part of it
    again = encode_state(base, spec, base, residual=encoded.residual, seed=2)
    assert again.residual is not None
    resent = decode_state(again, base)
    assert any(bool((resent[k] != base[k]).any()) for k in base)


def test_error_feedback_converges_on_repeated_updates() -> None:
    """Sending the same delta with EF: the cumulative sent approaches the cumulative true."""
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(200, generator=g).reshape(20, 10)
    base = {"w": torch.zeros(20, 10)}
    spec = CodecSpec(topk=0.05, targets=("*",), min_ndim=1)
    residual = None
    sent_total = torch.zeros(20, 10)
    rounds = 40
    for r in range(rounds):
        enc = encode_state({"w": delta}, spec, base, residual=residual, seed=r)
        residual = enc.residual
        sent_total += decode_state(enc, base)["w"]
    assert residual is not None
    assert torch.allclose(sent_total + residual["w"], delta * rounds, atol=1e-3)
    assert (sent_total / rounds - delta).abs().max() < delta.abs().max() / 4


def test_delta_without_or_with_wrong_base_raises(state: dict[str, torch.Tensor]) -> None:
    base = make_state(1)
    encoded = encode_state(state, CodecSpec(), base)
    with pytest.raises(BaseMismatchError):
        decode_state(encoded)
    with pytest.raises(BaseMismatchError):
        decode_state(encoded, make_state(2))


def test_bad_arguments_are_type_errors(state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(TypeError):
        encode_state({"w": [1.0, 2.0]}, CodecSpec())  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        encode_state(state, "int8")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        EncodedModel.from_bytes("not bytes")  # type: ignore[arg-type]


def test_encoding_does_not_mutate_inputs(state: dict[str, torch.Tensor]) -> None:
    base = make_state(1)
    before = {k: v.clone() for k, v in state.items()}
    base_before = {k: v.clone() for k, v in base.items()}
    residual = {"fc1.weight": torch.ones(16, 72)}
    spec = CodecSpec(topk=0.2, quant=QuantSpec(4), targets=("*",), min_ndim=1)
    encode_state(state, spec, base, residual=residual)
    _assert_bit_exact(before, state)
    _assert_bit_exact(base_before, base)
    assert torch.equal(residual["fc1.weight"], torch.ones(16, 72))


def test_header_overhead_is_small_for_a_tiny_update() -> None:
    """FINDINGS: at ~2 KB, headers must stay well under a tenth of the message."""
    g = torch.Generator().manual_seed(0)
    names = [
        "conv1.weight",
        "conv1.bias",
        "conv2.weight",
        "conv2.bias",
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
    ]
    shapes = [(16, 1, 3, 3), (16,), (32, 16, 3, 3), (32,), (64, 512), (64,), (10, 64), (10,)]
    base = {n: torch.randn(s, generator=g) for n, s in zip(names, shapes, strict=True)}
    new = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    spec = CodecSpec(
        topk=0.03, quant=QuantSpec(4, rounding=Rounding.STOCHASTIC), targets=("*",), min_ndim=1
    )
    encoded = encode_state(new, spec, base, seed=0)
    total = encoded.nbytes
    payload = sum(len(r.body) for r in encoded.records)
    assert total < 2200
    assert total - payload < 0.1 * total, (total, payload)
    # a pruned, weight-shared model of the same architecture sent in full
    pruned = CodecSpec(
        prune=PruneSpec(PruneMethod.L1_GLOBAL, 0.95),
        quant=QuantSpec(3, QuantScheme.KMEANS),
        entropy_level=19,
    )
    full = encode_state(new, pruned)
    overhead = full.nbytes - sum(len(r.body) for r in full.records)
    assert overhead < 0.1 * full.nbytes, (full.nbytes, overhead)


def test_codec_error_is_raised_for_garbage() -> None:
    with pytest.raises(CodecError):
        EncodedModel.from_bytes(b"\x00" * 64)


def test_compressed_sparse_record_with_large_positions_parses() -> None:
    """Positions are measured before entropy coding: they may exceed the compressed body."""
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(1024, 1024, generator=g)}
    spec = CodecSpec(
        topk=0.1, quant=QuantSpec(4, rounding=Rounding.STOCHASTIC), targets=("*",), min_ndim=1
    )
    encoded = encode_state({"w": base["w"] + 0.001}, spec, base, seed=1)
    again = EncodedModel.from_bytes(encoded.to_bytes())
    assert torch.equal(decode_state(again, base)["w"], decode_state(encoded, base)["w"])


def test_concurrent_decoding_is_thread_safe() -> None:
    import threading

    g = torch.Generator().manual_seed(2)
    state = {"w": torch.randn(256, 256, generator=g), "v": torch.randn(100, 100, generator=g)}
    data = encode_state(state, CodecSpec(entropy_level=3)).to_bytes()
    errors: list[Exception] = []

    def work() -> None:
        for _ in range(6):
            try:
                out = decode_state(EncodedModel.from_bytes(data))
                if not torch.equal(out["w"], state["w"]):
                    errors.append(AssertionError("wrong values"))
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
