"""Lossless deltas XORed chunk by chunk as their planes are split (issue 14, bounded
memory): the same bytes as grouping the whole XOR, bit-exact decodes on every float
dtype, unchanged tensors still ZERO records, and a bounded peak of memory (in a
subprocess: nothing here measures or asserts a time)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsqueeze.bench.memprobe import run_measured
from fedsqueeze.codec import EncodedModel, decode_state, encode_state, tensor_encode
from fedsqueeze.codec.container import ValueKind
from fedsqueeze.codec.finite import NonFinite
from fedsqueeze.codec.grouping import GROUPED_DTYPES, decode_grouped, encode_grouped
from fedsqueeze.codec.spec_text import parse_spec

_INT_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEWS[t.element_size()])


def _pair(dtype: torch.dtype, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A base and a next version: a fifth of the values moved a little, NaN payloads,
    −0.0 and Inf in both, one change in the very last value."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g, dtype=torch.float64) * 0.05).to(dtype)
    moved = base.to(torch.float64) + torch.randn(n, generator=g, dtype=torch.float64) * 1e-4
    new = torch.where(torch.rand(n, generator=g) < 0.2, moved.to(dtype), base)
    nan = {2: 0x7C01, 4: 0x7FC00001, 8: 0x7FF0000000000001}[dtype.itemsize]
    if dtype == torch.bfloat16:
        nan = 0x7F81
    for t in (base, new):
        bits = _bits(t)
        bits[:3] = torch.tensor([nan, 0, -1]).to(bits.dtype)
    _bits(new)[3] = -(1 << (8 * dtype.itemsize - 1))  # −0.0 against 0.0
    _bits(new)[-1] ^= 1
    return base, new


@pytest.mark.parametrize("dtype", GROUPED_DTYPES)
@pytest.mark.parametrize("chunk_log2", [10, 12, 20])
def test_xor_while_splitting_gives_the_bytes_of_the_whole_xor(
    dtype: torch.dtype, chunk_log2: int
) -> None:
    # Many windows of chunks (2^10 values: dozens of them) and a short last chunk.
    base, new = _pair(dtype, (11 << 12) + 37, 5)
    whole = encode_grouped(_bits(new) ^ _bits(base), dtype, chunk_log2)
    chunked = encode_grouped(new, dtype, chunk_log2, base=base)
    assert bytes(chunked) == bytes(whole)
    assert chunked.readonly
    xor = decode_grouped(chunked, dtype, new.numel())
    assert torch.equal(_bits(xor) ^ _bits(base), _bits(new))


def test_a_base_of_another_length_or_width_is_refused() -> None:
    x = torch.zeros(5000)
    with pytest.raises(ValueError, match="XOR"):
        encode_grouped(x, torch.float32, base=torch.zeros(4999))
    with pytest.raises(ValueError, match="XOR"):
        encode_grouped(x, torch.float32, base=torch.zeros(5000, dtype=torch.float16))


@pytest.mark.parametrize("dtype", GROUPED_DTYPES)
def test_large_lossless_deltas_decode_bit_exactly(dtype: torch.dtype) -> None:
    # Above the 1 MiB where the plain record is no longer compared: the chunked path.
    n = (3 << 20) // dtype.itemsize + 5
    base, new = _pair(dtype, n, 7)
    small_base, small_new = _pair(dtype, 2000, 8)
    state = {"big": new, "small": small_new, "same": base.clone()}
    bases = {"big": base, "small": small_base, "same": base}
    encoded = encode_state(state, parse_spec("lossless"), bases, nonfinite=NonFinite.CARRY)
    records = {r.name: r for r in encoded.records}
    assert records["big"].value_kind is ValueKind.GROUPED_XOR
    assert bytes(records["big"].body) == bytes(
        encode_grouped(_bits(new) ^ _bits(base), dtype)
    )  # what grouping the whole XOR writes
    assert records["same"].zero
    decoded = decode_state(EncodedModel.from_bytes(encoded.to_bytes()), bases)
    for name, t in state.items():
        assert torch.equal(_bits(decoded[name]), _bits(t)), name


def test_a_change_in_the_last_value_only_is_not_a_zero_record() -> None:
    base = torch.randn(1 << 20)
    new = base.clone()
    _bits(new)[-1] ^= 1 << 31  # the sign of the last value: beyond every early probe
    encoded = encode_state({"w": new}, parse_spec("lossless"), {"w": base})
    (record,) = encoded.records
    assert not record.zero
    decoded = decode_state(EncodedModel.from_bytes(encoded.to_bytes()), {"w": base})
    assert torch.equal(_bits(decoded["w"]), _bits(new))


def test_a_large_delta_grouping_cannot_shrink_is_a_plain_xor_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[bool] = []

    def spy(*args: Any, **kwargs: Any) -> memoryview:
        calls.append(kwargs.get("base") is not None)
        return encode_grouped(*args, **kwargs)

    monkeypatch.setattr(tensor_encode, "encode_grouped", spy)
    g = torch.Generator().manual_seed(3)
    base, new = (torch.randint(-(1 << 31), 1 << 31, (1 << 19,), generator=g) for _ in "ab")
    base, new = base.to(torch.int32).view(torch.float32), new.to(torch.int32).view(torch.float32)
    encoded = encode_state(
        {"w": new}, parse_spec("lossless"), {"w": base}, nonfinite=NonFinite.CARRY
    )
    (record,) = encoded.records
    assert record.value_kind is ValueKind.XOR and not record.zero
    assert calls == [True]  # grouped once, chunk by chunk; not again on the whole XOR
    decoded = decode_state(EncodedModel.from_bytes(encoded.to_bytes()), {"w": base})
    assert torch.equal(_bits(decoded["w"]), _bits(new))


# The child: a 128 MiB fp32 tensor and its base are made before the baseline (they are
# the input); its lossless delta is encoded as the streaming encoder does (the body goes
# to a store that keeps only its length, as a spool file would).
_CHILD = """
import json, sys, torch
from fedsqueeze.bench.memprobe import anon_bytes
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.codec.stream_encode import encode_stream
n = 32 << 20
g = torch.Generator().manual_seed(0)
base = torch.randn(n, generator=g) * 0.02
new = base + torch.randn(n, generator=g) * 1e-4
class Store:
    def __init__(self):
        self.sizes = []
    def put(self, body):
        self.sizes.append(len(body))
        return len(self.sizes) - 1
store = Store()
from fedsqueeze.bench.memprobe import settled_baseline
settled_baseline()  # the compiled kernels too: a process's cost, not the tensor's
open(sys.argv[1], "w").close()  # the setup's peak (the inputs' temporaries) is left out
baseline = anon_bytes()
encode_stream({"w": new}, parse_spec("lossless"), store, {"w": base}, workers=1)
print(json.dumps({"baseline_anon": baseline, "body": store.sizes[0]}))
"""

#: What any run takes whatever the tensor: zstd contexts, the pool's threads and their
#: scratch, allocator arenas (the same allowance as the model-sized memory tests).
_ALLOWANCE = 16 << 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_large_lossless_delta_holds_no_copy_of_the_tensor(tmp_path: Path) -> None:
    raw = 4 * (32 << 20)
    phase = tmp_path / "setup-done"
    measured = run_measured(["-c", _CHILD, str(phase)], timeout=120, phase_file=phase)
    assert measured.returncode == 0, measured.stderr[-2000:]
    report = measured.report
    assert report["baseline_anon"] > 0 and 0 < report["body"] < raw
    working = measured.extra - report["body"]
    # Before: the whole XOR, its planes and the joined body (233 MB here, 1.8 copies of
    # the tensor; 16-19 MB now). Now a window of chunks (one per core) of 2^20 values,
    # each with its staged planes, their frames and the body pages being written (each
    # at most its 4 MiB of input), and the allowance.
    chunks = min(os.cpu_count() or 1, raw // (4 << 20))
    bound = chunks * 3 * (4 << 20) + _ALLOWANCE
    assert working <= bound, json.dumps(
        {"working_mb": working / 1e6, "bound_mb": bound / 1e6, "body_mb": report["body"] / 1e6}
    )


@pytest.mark.parametrize("dtype", GROUPED_DTYPES)
def test_the_base_is_xored_inside_the_decode(dtype: torch.dtype) -> None:
    """``decode_grouped(base=...)`` XORs each chunk with the base's bits as it decodes
    it: the same bits as decoding the XOR and XORing afterwards, over chunks that end
    short; a base of another size or width is refused."""
    n = 3 * (1 << 17) + 11
    base, new = _pair(dtype, n, seed=5)
    body = bytes(encode_grouped(new, dtype, 17, base=base))
    plain = decode_grouped(body, dtype, n, buckets=True)
    inside = decode_grouped(body, dtype, n, buckets=True, base=base)
    assert torch.equal(_bits(inside), _bits(plain) ^ _bits(base))
    assert torch.equal(_bits(inside), _bits(new))
    with pytest.raises(ValueError, match="cannot XOR"):
        decode_grouped(body, dtype, n, buckets=True, base=base[:-1])
    other = torch.float64 if dtype.itemsize != 8 else torch.float32
    with pytest.raises(ValueError, match="cannot XOR"):
        decode_grouped(body, dtype, n, buckets=True, base=base.to(other))
