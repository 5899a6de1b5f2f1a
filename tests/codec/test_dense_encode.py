"""Dense records encoded in a pipeline (fedsqueeze.codec.dense_encode): the NumPy chunk
kernels give the codes of quantize + pack_bits bit for bit (odd sizes, chunk and byte
boundaries, short last runs, exact ties), the body decodes to them with any zstd
decoder (literal-only pieces spliced into one frame, one stream, or raw codes), and
encode_state's values do not depend on the pipeline.

Thresholds and chunks are made tiny so every path runs on small inputs, on two worker
threads; one test runs at the real 8 MiB threshold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import zstandard

from fedsqueeze.codec import dense_encode, entropy, literal_frames
from fedsqueeze.codec.bitpack import pack_bits
from fedsqueeze.codec.model import EncodedModel, decode_state, encode_state
from fedsqueeze.codec.quantization import Runs, choose_qparams, quantize
from fedsqueeze.codec.spec import Granularity, QuantScheme, Rounding
from fedsqueeze.codec.spec_text import parse_spec

SCHEMES = [
    (QuantScheme.AFFINE, 2),
    (QuantScheme.AFFINE, 4),
    (QuantScheme.AFFINE, 8),
    (QuantScheme.SYMMETRIC, 4),
    (QuantScheme.SYMMETRIC, 8),
    (QuantScheme.POW2, 8),
    (QuantScheme.NF4, 4),
]


@contextlib.contextmanager
def tiny(chunk: int = 96, above: int = 64) -> Iterator[list[int]]:
    """Small chunks and threshold, two threads, zstd's single-threaded mode at every size
    (as the pipeline's: the one-call frame and the streamed one are then the same);
    yields a list counting calls of encode_dense."""
    saved = (
        dense_encode._CHUNK, dense_encode.PIPELINE_ABOVE, entropy.THREADED_FROM,
        dense_encode.encode_dense, torch.get_num_threads(), dense_encode.encode_dense_blocks,
    )  # fmt: skip
    encode, encode_blocks = saved[3], saved[5]
    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> dense_encode.DenseBody:
        calls.append(1)
        return encode(*args, **kwargs)

    def counted_blocks(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)  # block-wise params chosen inside the pipeline
        return encode_blocks(*args, **kwargs)

    dense_encode._CHUNK, dense_encode.PIPELINE_ABOVE = chunk, above
    entropy.THREADED_FROM = 1 << 62
    dense_encode.encode_dense = counted
    dense_encode.encode_dense_blocks = counted_blocks
    torch.set_num_threads(2)
    try:
        yield calls
    finally:
        (
            dense_encode._CHUNK, dense_encode.PIPELINE_ABOVE, entropy.THREADED_FROM,
            dense_encode.encode_dense, threads, dense_encode.encode_dense_blocks,
        ) = saved  # fmt: skip
        torch.set_num_threads(threads)


def values(n: int, seed: int) -> torch.Tensor:
    """Normal values with outliers, exact zeros and repeated values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 3
    if n > 10:
        x[::7] = 0.0
        x[3::11] = x[5]
        x[1] = 40.0
    return x


def reference(x: torch.Tensor, qp: Any, runs: Runs | None) -> bytes:
    return bytes(pack_bits(quantize(x, qp, Rounding.NEAREST, runs), qp.bits).numpy())


def params(x: torch.Tensor, scheme: QuantScheme, bits: int, length: int | None) -> Any:
    runs = None if length is None else Runs(length)
    gran = Granularity.PER_TENSOR if runs is None else Granularity.PER_BLOCK
    return choose_qparams(x, bits, scheme, gran, runs, 1 if runs is None else runs.count(x.numel()))


@pytest.mark.parametrize(("scheme", "bits"), SCHEMES)
@pytest.mark.parametrize("length", [None, 1, 7, 64, 100])
@pytest.mark.parametrize("n", [1, 3, 95, 96, 97, 1_001])
def test_kernels_match_quantize_and_pack(
    scheme: QuantScheme, bits: int, length: int | None, n: int
) -> None:
    x = values(n, n + bits)
    runs = None if length is None else Runs(length)
    qp = params(x, scheme, bits, length)
    with tiny(chunk=8):
        got = dense_encode.quantize_packed(x, qp, runs)
    assert bytes(got.numpy()) == reference(x, qp, runs)


@pytest.mark.parametrize(("scheme", "bits"), SCHEMES)
def test_ties_round_as_quantize_does(scheme: QuantScheme, bits: int) -> None:
    """Values at exact half steps (round half to even) and at NF4 midpoints."""
    x = values(64, 1)
    qp = params(x, scheme, bits, None)
    scale = float(qp.scale)
    steps = torch.arange(-(1 << bits), (1 << bits) + 1, dtype=torch.float32)
    ties = torch.cat((steps * scale, (steps + 0.5) * scale, (steps - 0.5) * scale))
    if scheme is QuantScheme.NF4:
        from fedsqueeze.codec.blockwise import NF4_CODEBOOK

        mids = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2
        ties = torch.cat((ties.clamp(-scale, scale), mids * scale, NF4_CODEBOOK * scale))
    with tiny(chunk=8):
        got = dense_encode.quantize_packed(ties, qp, None)
    assert bytes(got.numpy()) == reference(ties, qp, None)


@pytest.mark.parametrize(("scheme", "bits"), SCHEMES)
@pytest.mark.parametrize("length", [None, 64, 100])
@pytest.mark.parametrize("n", [5_000, 5_001, 96 * 40])
@pytest.mark.parametrize("chunk", [96, 4_096])
def test_encode_dense_body_decodes_to_the_codes(
    scheme: QuantScheme, bits: int, length: int | None, n: int, chunk: int
) -> None:
    """Whatever the coder chosen, the body is raw codes or one frame that any zstd
    decoder reads as the codes."""
    x = values(n, bits * 7 + n)
    runs = None if length is None else Runs(length)
    qp = params(x, scheme, bits, length)
    expected = reference(x, qp, runs)
    with tiny(chunk=chunk):
        coded = dense_encode.encode_dense(x, qp, runs, 3)
    assert bytes(coded.packed.numpy()) == expected
    if coded.raw_length is None:
        assert coded.body == expected
    else:
        assert coded.raw_length == len(expected)
        assert len(coded.body) < len(expected)
        assert entropy.decompress(coded.body, len(expected)) == expected
        framed = b"\x28\xb5\x2f\xfd" + coded.body
        assert zstandard.ZstdDecompressor().decompressobj().decompress(framed) == expected


def test_incompressible_codes_are_stored_raw(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uniform codes: the size sample (above SAMPLE_ABOVE) says zstd is not worth it."""
    x = torch.rand(40_000, generator=torch.Generator().manual_seed(3))
    qp = params(x, QuantScheme.AFFINE, 8, None)
    monkeypatch.setattr(entropy, "SAMPLE_ABOVE", 1000)
    monkeypatch.setattr(entropy, "SAMPLE_BYTES", 4096)
    with tiny():
        coded = dense_encode.encode_dense(x, qp, None, 3)
    assert coded.raw_length is None
    assert coded.body == reference(x, qp, None)


SPECS = [
    "int8",
    "quant=8:channel",
    "int4",
    "quant=2",
    "quant=4:block64",
    "quant=4:nf4:block64",
    "quant=2:block32",
    "quant=4:block96",
    "quant=8:block4096:symmetric",
    "quant=4:channel",
    "quant=8:pow2",
    "quant=4:nf4:block64:hadamard",
    "quant=4:nf4:block64:dq",
    "quant=4:symmetric:block32:bf16",
    "quant=8:block64:fp32",
    "quant=3",  # not pipelined (3-bit codes)
    "int8,entropy=0",  # no zstd: the pipeline's kernels, stored raw (the same bytes)
    "quant=4:block64,entropy=0",
    "quant=4:nf4:block64,entropy=0",
    "quant=8:stochastic",  # not pipelined (stochastic rounding)
]
SHAPES = [(7, 3, 611), (97, 131), (1, 5_001), (3, 4_097)]


@pytest.mark.parametrize("spec_text", SPECS)
@pytest.mark.parametrize("shape", SHAPES)
def test_encode_state_values_do_not_depend_on_the_pipeline(
    spec_text: str, shape: tuple[int, ...]
) -> None:
    """The pipeline's record decodes to the values of the stages run one after the
    other (its zstd frame may differ: literal-only pieces); records it does not take
    keep their bytes."""
    x = values(int(torch.tensor(shape).prod()), len(spec_text) + shape[0]).reshape(shape)
    spec = parse_spec(spec_text)
    with tiny() as calls:
        fast = encode_state({"layer.weight": x}, spec, seed=0).to_bytes()
        dense_encode.ENABLED = False
        try:
            slow = encode_state({"layer.weight": x}, spec, seed=0).to_bytes()
        finally:
            dense_encode.ENABLED = True
    q = spec.quant
    assert q is not None
    piped = q.bits in (2, 4, 8) and spec.entropy_level > 0 and q.rounding is Rounding.NEAREST
    assert len(calls) == (1 if piped else 0)
    if not piped:
        assert fast == slow
    decoded = decode_state(EncodedModel.from_bytes(fast))["layer.weight"]
    expected = decode_state(EncodedModel.from_bytes(slow))["layer.weight"]
    assert decoded.shape == x.shape
    assert torch.equal(decoded.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize(
    "spec_text",
    [
        "int8,entropy=0",
        "quant=4:block64,entropy=0",
        "quant=4:nf4:block32,entropy=0",
        "quant=2:channel,entropy=0",
    ],
)
def test_raw_codes_come_from_the_pipelines_kernels_with_the_same_bytes(
    spec_text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``entropy=0`` a large dense tensor is quantized and packed on the worker
    threads (``quantize_packed``) and stored as it is: the bytes of the stages run one
    after the other (a dense tensor's channels are runs of rows: pipelined too)."""
    x = values(97 * 131, 5).reshape(97, 131)
    spec = parse_spec(spec_text)
    calls: list[int] = []
    packed = dense_encode.quantize_packed

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return packed(*args, **kwargs)

    monkeypatch.setattr(dense_encode, "quantize_packed", counted)
    with tiny():
        fast = encode_state({"layer.weight": x}, spec).to_bytes()
        dense_encode.ENABLED = False
        try:
            slow = encode_state({"layer.weight": x}, spec).to_bytes()
        finally:
            dense_encode.ENABLED = True
    assert len(calls) == 1
    assert fast == slow


@pytest.mark.parametrize(
    ("n", "bits"),
    [
        (dense_encode.PIPELINE_ABOVE + 1, 8),
        (entropy.THREADED_FROM + 3, 8),  # one call would use zstd's threads
        (entropy.THREADED_FROM, 8),  # a multiple of zstd's blocks
        (2 * entropy.THREADED_FROM + 2, 4),
    ],
)
def test_at_the_real_thresholds(n: int, bits: int) -> None:
    """Real sizes: the frame is literal-only pieces that decode to the codes (on every
    core or as one stream), at most 0.5% larger than one zstd call's frame, and does not
    depend on the threads' timing."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(11))
    qp = params(x, QuantScheme.AFFINE, bits, None)
    expected = reference(x, qp, None)
    coded = dense_encode.encode_dense(x, qp, None, 3)
    size = len(expected)
    assert coded.raw_length == size
    assert entropy.decompress(coded.body, size) == expected
    one_call = entropy.compress(expected, 3)
    assert one_call is not None
    assert len(coded.body) <= 1.005 * len(one_call)
    pieces = literal_frames.plan(coded.body, size, 1 << 18)
    assert pieces is not None and len(pieces.segments) > 1
    again = dense_encode.encode_dense(x, qp, None, 3)
    assert again.body == coded.body
    saved = dense_encode._CHUNK
    dense_encode._CHUNK = 12_345 * 8
    try:
        other = dense_encode.encode_dense(x, qp, None, 3)
    finally:
        dense_encode._CHUNK = saved
    assert entropy.decompress(other.body, size) == expected
    # What any zstd reader takes: the framed stream.
    framed = b"\x28\xb5\x2f\xfd" + coded.body
    assert zstandard.ZstdDecompressor().decompressobj().decompress(framed) == expected
