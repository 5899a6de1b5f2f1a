"""Dense records decoded while zstd decompresses (fedsqueeze.codec.dense_decode) and the
streaming zstd reader under it (entropy.decompress_into): bit-identical to the
sequential path (decompress → unpack_bits → dequantize) on odd sizes, chunk and byte
boundaries and short last runs, and the same FormatErrors on corrupt bodies.

Thresholds, chunks and zstd steps are made tiny so every path runs on small inputs, on
two worker threads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import zstandard

from fedsqueeze.codec import dense_decode, entropy
from fedsqueeze.codec.bitpack import pack_bits, unpack_bits
from fedsqueeze.codec.model import EncodedModel, decode_state, encode_state
from fedsqueeze.codec.quantization import Runs, choose_qparams, dequantize, quantize
from fedsqueeze.codec.spec import Granularity, QuantScheme, Rounding
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.errors import FormatError

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
    "quant=3",  # not pipelined (3-bit codes): the sequential path
]
SHAPES = [(7, 3, 611), (97, 131), (64, 64), (1, 5_001), (5_001, 1), (3, 4_097)]


@contextlib.contextmanager
def tiny(chunk: int = 96, step: int = 37, above: int = 64) -> Iterator[list[int]]:
    """Small pipeline thresholds on two threads; yields a list counting pipelined decodes."""
    saved = (
        dense_decode._CHUNK, dense_decode._STEP, dense_decode.PIPELINE_ABOVE,
        dense_decode.decode_dense, torch.get_num_threads(),
    )  # fmt: skip
    decode = saved[3]
    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return decode(*args, **kwargs)

    dense_decode._CHUNK, dense_decode._STEP, dense_decode.PIPELINE_ABOVE = chunk, step, above
    dense_decode.decode_dense = counted
    torch.set_num_threads(2)
    try:
        yield calls
    finally:
        (
            dense_decode._CHUNK, dense_decode._STEP, dense_decode.PIPELINE_ABOVE,
            dense_decode.decode_dense, threads,
        ) = saved  # fmt: skip
        torch.set_num_threads(threads)


@contextlib.contextmanager
def sequential_path() -> Iterator[None]:
    saved = dense_decode.PIPELINE_ABOVE
    dense_decode.PIPELINE_ABOVE = 1 << 62
    try:
        yield
    finally:
        dense_decode.PIPELINE_ABOVE = saved


def sequential(blob: bytes) -> dict[str, torch.Tensor]:
    with sequential_path():
        return decode_state(EncodedModel.from_bytes(blob))


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("spec_text", SPECS)
@pytest.mark.parametrize("shape", SHAPES)
def test_pipelined_decode_is_bit_identical(spec_text: str, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(len(spec_text) * 31 + shape[0])
    rows = (1 + torch.arange(shape[0]) % 5).to(torch.float32)
    x = torch.randn(shape, generator=g) * rows.reshape(-1, *[1] * (len(shape) - 1))
    blob = encode_state({"layer.weight": x}, parse_spec(spec_text)).to_bytes()
    with tiny() as calls:
        fast = decode_state(EncodedModel.from_bytes(blob))["layer.weight"]
    assert bits_equal(fast, sequential(blob)["layer.weight"])
    quant = EncodedModel.from_bytes(blob).records[0].quant
    assert quant is not None
    assert bool(calls) == (quant.bits != 3)


def test_pipelined_decode_of_a_delta() -> None:
    g = torch.Generator().manual_seed(5)
    base = {"layer.weight": torch.randn(70, 90, generator=g)}
    new = {"layer.weight": base["layer.weight"] + 0.1 * torch.randn(70, 90, generator=g)}
    blob = encode_state(new, parse_spec("quant=4:block64"), base=base).to_bytes()
    with tiny() as calls:
        fast = decode_state(EncodedModel.from_bytes(blob), base)["layer.weight"]
    with sequential_path():
        slow = decode_state(EncodedModel.from_bytes(blob), base)["layer.weight"]
    assert calls and bits_equal(fast, slow)


@pytest.mark.parametrize(
    ("scheme", "bits"),
    [
        (QuantScheme.AFFINE, 2),
        (QuantScheme.AFFINE, 4),
        (QuantScheme.AFFINE, 8),
        (QuantScheme.SYMMETRIC, 4),
        (QuantScheme.SYMMETRIC, 8),
        (QuantScheme.POW2, 8),
        (QuantScheme.NF4, 4),
    ],
)
@pytest.mark.parametrize("length", [None, 1, 7, 64, 100])
@pytest.mark.parametrize("n", [1, 3, 95, 96, 97, 1_001])
@pytest.mark.parametrize("compressed", [True, False])
def test_decode_dense_against_dequantize(
    scheme: QuantScheme, bits: int, length: int | None, n: int, compressed: bool
) -> None:
    g = torch.Generator().manual_seed(n + bits)
    x = torch.randn(n, generator=g) * 3
    runs = None if length is None else Runs(length)
    gran = Granularity.PER_TENSOR if runs is None else Granularity.PER_BLOCK
    count = 1 if runs is None else runs.count(n)
    qp = choose_qparams(x, bits, scheme, gran, runs, count)
    codes = quantize(x, qp, Rounding.NEAREST, runs)
    packed = bytes(pack_bits(codes, bits).numpy())
    expected = dequantize(
        unpack_bits(torch.frombuffer(bytearray(packed), dtype=torch.uint8), bits, n), qp, runs
    )
    body: bytes = packed
    raw_length: int | None = None
    if compressed:
        body = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(packed)[4:]
        raw_length = len(packed)
    with tiny(chunk=8, step=5):
        got = dense_decode.decode_dense(body, raw_length, n, qp, runs)
    assert bits_equal(got, expected)


@pytest.mark.parametrize("compressed", [True, False])
def test_nonzero_padding_bits_are_refused(compressed: bool) -> None:
    qp = choose_qparams(torch.randn(5), 4, QuantScheme.AFFINE, Granularity.PER_TENSOR)
    packed = bytes([0x21, 0x43, 0xF5])  # 5 codes; the high nibble of the last byte is padding
    body = zstandard.ZstdCompressor().compress(packed)[4:] if compressed else packed
    with tiny(chunk=2, step=1), pytest.raises(FormatError, match="padding"):
        dense_decode.decode_dense(body, 3 if compressed else None, 5, qp, None)


def frame(data: bytes, level: int = 3) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_content_size=False).compress(data)[4:]


def streamed(data: bytes | memoryview, size: int, step: int = 1_000) -> bytes:
    out = bytearray(size)
    filled = list(entropy.decompress_into(data, memoryview(out), step))
    assert filled == sorted(filled) and filled[-1] == size
    return bytes(out)


@pytest.mark.parametrize("size", [16, 1_000, 70_000, 300_001])
def test_decompress_into_matches_decompress(size: int) -> None:
    g = torch.Generator().manual_seed(size)
    data = bytes(torch.randint(0, 20, (size,), generator=g, dtype=torch.uint8).numpy())
    body = frame(data)
    assert streamed(body, size) == entropy.decompress(body, size) == data
    assert entropy.frame_length(body, size) == len(body)


def test_decompress_into_refuses_what_decompress_refuses() -> None:
    data = bytes(range(256)) * 300
    body = frame(data)
    bad: list[tuple[bytes, int]] = [
        (body + b"\x00", len(data)),  # data after the frame
        (body[:-1], len(data)),  # truncated
        (body, len(data) + 1),  # decodes to fewer bytes
        (body, len(data) - 1),  # to more
        (b"\x08" + body[1:], len(data)),  # reserved header bit
        (b"", 10),
    ]
    for data_bad, size in bad:
        with pytest.raises(FormatError):
            streamed(data_bad, size)
    for i in range(len(body)):  # every byte flipped: the one-call decoder's verdict
        flipped = bytearray(body)
        flipped[i] ^= 0x5A
        try:
            expected = entropy.decompress(bytes(flipped), len(data))
        except FormatError:
            with pytest.raises(FormatError):
                streamed(bytes(flipped), len(data))
        else:
            assert streamed(bytes(flipped), len(data)) == expected
    with pytest.raises(FormatError):
        list(entropy.decompress_into(body, memoryview(bytearray(0)), 10))


def test_declared_content_size_is_checked() -> None:
    data = bytes(1_000)
    body = zstandard.ZstdCompressor(write_content_size=True).compress(data)[4:]
    assert streamed(body, 1_000) == data
    with pytest.raises(FormatError, match="declares"):
        streamed(body, 999)


def test_many_small_blocks_and_large_windows_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytes(range(256)) * 64
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    parts = [
        cobj.compress(data[i : i + 100]) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        for i in range(0, len(data), 100)
    ]
    body = (b"".join(parts) + cobj.flush())[4:]
    monkeypatch.setattr(entropy, "_MAX_WALKED_BLOCKS", 3)
    assert entropy.frame_length(body, len(data)) is None
    assert streamed(body, len(data)) == data
    with pytest.raises(FormatError):
        streamed(body + b"\x01", len(data))
    monkeypatch.setattr(entropy, "_SMALL_WINDOW", 1)  # every window is larger than 16 KB
    assert streamed(frame(data, 19), len(data)) == data


@pytest.mark.parametrize("spec_text", ["int8", "quant=4:block64", "quant=4:nf4:block64", "quant=2"])
def test_torch_and_numpy_kernels_agree(spec_text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's "(before)" switch: the torch chunk kernels give the same values."""
    x = torch.randn(3, 4_097, generator=torch.Generator().manual_seed(9))
    blob = encode_state({"layer.weight": x}, parse_spec(spec_text)).to_bytes()
    with tiny():
        numpy_kernels = decode_state(EncodedModel.from_bytes(blob))["layer.weight"]
        monkeypatch.setattr(dense_decode, "TORCH_KERNELS", True)
        torch_kernels = decode_state(EncodedModel.from_bytes(blob))["layer.weight"]
    assert bits_equal(numpy_kernels, torch_kernels)
    assert bits_equal(numpy_kernels, sequential(blob)["layer.weight"])
