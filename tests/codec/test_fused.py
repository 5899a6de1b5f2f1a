"""The fused device paths (fedsqueeze.codec.fused) against the reference stages: the same
codes, bytes, decoded values and kept indices, on the CPU here and on CUDA when present."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

from fedsqueeze.codec import (
    bitpack,
    decode_state,
    encode_state,
    fused,
    fused_compile,
    fused_select,
    pruning,
    triton_select,
)
from fedsqueeze.codec.kernels import Runs
from fedsqueeze.codec.quantization import (
    choose_qparams,
    dequantize,
    qparams_to_bytes,
    quantize,
)
from fedsqueeze.codec.spec import Granularity, QuantScheme, QuantSpec, Rounding, ScaleFormat
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.errors import FormatError

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

SIZES = (1, 2, 7, 63, 64, 65, 1000, 1023, 1024, 1025, 4097, 70_001)


def _values(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * (10.0 ** (seed % 5 - 2))
    if n > 8:
        x[:: max(2, n // 7)] = 0.0  # exact zeros, as deltas have
        x[1] = -x.abs().max() * 1.5  # an outlier
    return x.to(dtype)


def _specs() -> list[QuantSpec]:
    out = []
    for bits in (2, 3, 4, 8):
        for scheme in (QuantScheme.AFFINE, QuantScheme.SYMMETRIC):
            out.append(QuantSpec(bits, scheme))
            out.append(QuantSpec(bits, scheme, Granularity.PER_CHANNEL))
            for block in (32, 64, 100):
                for fmt in (ScaleFormat.FP16, ScaleFormat.BF16, ScaleFormat.FP32):
                    out.append(QuantSpec(bits, scheme, Granularity.PER_BLOCK, block_size=block,
                                         scale_format=fmt))  # fmt: skip
    out.append(QuantSpec(4, QuantScheme.NF4))
    for fmt in ScaleFormat:
        out.append(QuantSpec(4, QuantScheme.NF4, Granularity.PER_BLOCK, block_size=64,
                             scale_format=fmt))  # fmt: skip
    out.append(QuantSpec(8, QuantScheme.AFFINE, Granularity.PER_BLOCK, block_size=64,
                         scale_format=ScaleFormat.DQ8))  # fmt: skip
    return out


def _channels(q: QuantSpec, n: int) -> tuple[Runs | None, int]:
    if q.granularity is Granularity.PER_TENSOR:
        return None, 1
    if q.granularity is Granularity.PER_CHANNEL:
        rows = 7 if n >= 7 else 1
        stride = max(1, n // rows)
        return Runs(stride), Runs(stride).count(n)
    assert q.block_size is not None
    return Runs(q.block_size), Runs(q.block_size).count(n)


def _reference(values: torch.Tensor, q: QuantSpec, runs: Runs | None, count: int):  # type: ignore[no-untyped-def]
    qp = choose_qparams(values, q.bits, q.scheme, q.granularity, runs, count, q.scales)
    codes = quantize(values, qp, Rounding.NEAREST, runs)
    return qp, codes, bitpack.pack_bits(codes, q.bits)


def _check_equal(values: torch.Tensor, q: QuantSpec, device: str = "cpu") -> None:
    n = values.numel()
    runs, count = _channels(q, n)
    if q.granularity is Granularity.PER_CHANNEL and runs is not None and runs.count(n) != count:
        return
    qp, codes, packed = _reference(values, q, runs, count)
    done = fused.quantize_packed(values.to(device), q, runs, count).checked()
    assert torch.equal(done.packed.cpu(), packed), (q, n)
    assert qparams_to_bytes(done.qp) == qparams_to_bytes(qp), (q, n)
    ref = dequantize(codes, qp, runs)
    got = fused.dequantize_packed(done.packed, done.qp, n, runs)
    assert torch.equal(got.cpu(), ref), (q, n)
    # What a decoder sees: params parsed from bytes, on the CPU.
    got2 = fused.dequantize_packed(packed.to(device), qp, n, runs)
    assert torch.equal(got2.cpu(), ref), (q, n)


@pytest.mark.parametrize("q", _specs(), ids=str)
def test_quantize_pack_and_decode_equal_the_reference(q: QuantSpec) -> None:
    for i, n in enumerate(SIZES):
        _check_equal(_values(n, seed=i), q)


@pytest.mark.parametrize("seed", range(12))
def test_many_seeds_and_dtypes(seed: int) -> None:
    dtype = (torch.float32, torch.float16, torch.bfloat16, torch.float64)[seed % 4]
    n = 3000 + 997 * seed
    for q in (
        QuantSpec(8),
        QuantSpec(4, QuantScheme.NF4, Granularity.PER_BLOCK, block_size=64),
        QuantSpec(3, QuantScheme.SYMMETRIC, Granularity.PER_BLOCK, block_size=96),
        QuantSpec(2, QuantScheme.AFFINE, Granularity.PER_CHANNEL),
    ):
        _check_equal(_values(n, seed, dtype), q)


def test_nf4_midpoints_tie_down_as_the_reference() -> None:
    # Values exactly on the codebook's midpoints (and the ends) of a unit-scale block.
    from fedsqueeze.codec.blockwise import NF4_CODEBOOK

    mids = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2
    x = torch.cat((mids, -mids, NF4_CODEBOOK, torch.tensor([1.0, -1.0, 0.0])))
    for q in (
        QuantSpec(4, QuantScheme.NF4),
        QuantSpec(4, QuantScheme.NF4, Granularity.PER_BLOCK, block_size=32),
    ):
        _check_equal(x, q)


def test_non_contiguous_values() -> None:
    m = torch.randn(300, 70, generator=torch.Generator().manual_seed(3))
    values = m.t().reshape(-1)[::2]  # a copy of a strided walk: still 1-D
    strided = m.t()[0]  # a genuinely non-contiguous 1-D view
    assert not strided.is_contiguous()
    for q in (QuantSpec(8), QuantSpec(4, QuantScheme.NF4, Granularity.PER_BLOCK, block_size=32)):
        _check_equal(values, q)
        _check_equal(strided, q)


def test_refuses_what_the_reference_refuses() -> None:
    q = QuantSpec(8)
    for bad in (float("nan"), float("inf"), 2.0**127):
        x = torch.tensor([0.0, 1.0, bad])
        with pytest.raises(ValueError, match="finite"):
            choose_qparams(x, 8, QuantScheme.AFFINE, Granularity.PER_TENSOR)
        with pytest.raises(ValueError, match="finite"):
            fused.quantize_packed(x, q, None).checked()
    blocks = QuantSpec(4, QuantScheme.NF4, Granularity.PER_BLOCK, block_size=32)
    big = torch.full((40,), 1e5)
    with pytest.raises(ValueError, match="65504"):
        choose_qparams(big, 4, QuantScheme.NF4, Granularity.PER_BLOCK, Runs(32), 2,
                       ScaleFormat.FP16)  # fmt: skip
    with pytest.raises(ValueError, match="65504"):
        fused.quantize_packed(big, blocks, Runs(32), 2).checked()
    with pytest.raises(ValueError, match="at least one"):
        fused.quantize_packed(torch.empty(0), q, None)
    with pytest.raises(ValueError, match="1-D floating"):
        fused.quantize_packed(torch.ones(2, 2), q, None)
    with pytest.raises(ValueError, match="does not take"):
        fused.quantize_packed(torch.ones(4), QuantSpec(8, rounding=Rounding.STOCHASTIC), None)
    with pytest.raises(ValueError, match="fill"):
        fused.quantize_packed(torch.ones(100), blocks, Runs(32), 3)
    assert fused.encode_values(torch.empty(0), q, None, 1, None, False) is None


def test_supports_only_what_it_reproduces() -> None:
    assert fused.supports(QuantSpec(8), None)
    assert not fused.supports(QuantSpec(8, QuantScheme.POW2), None)
    assert not fused.supports(QuantSpec(3, QuantScheme.KMEANS), None)
    assert not fused.supports(QuantSpec(8, rounding=Rounding.STOCHASTIC), None)
    per_channel = QuantSpec(8, granularity=Granularity.PER_CHANNEL)
    assert fused.supports(per_channel, Runs(4))
    assert not fused.supports(per_channel, torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("bits", bitpack.SUPPORTED_BITS)
def test_bit_packing_equals_the_reference(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    for n in (0, 1, 2, 3, 5, 8, 9, 17, 24, 25, 1000, 4099):
        codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.uint8)
        packed = bitpack.pack_bits(codes, bits)
        assert torch.equal(fused.pack_bits(codes, bits), packed)
        assert torch.equal(fused.unpack_bits(packed, bits, n), codes)


def test_hostile_packed_input() -> None:
    codes = torch.tensor([1, 2, 3], dtype=torch.uint8)
    packed = bitpack.pack_bits(codes, 2)  # 6 of 8 bits used
    dirty = packed.clone()
    dirty[-1] |= 0x80
    for unpack in (bitpack.unpack_bits, fused.unpack_bits):
        with pytest.raises(FormatError, match="padding"):
            unpack(dirty, 2, 3)
        with pytest.raises(FormatError, match="need"):
            unpack(packed, 2, 9)
        with pytest.raises(FormatError, match="bits"):
            unpack(packed, 5, 3)
    with pytest.raises(ValueError, match="fit"):
        fused.pack_bits(torch.tensor([4], dtype=torch.uint8), 2)
    qp = choose_qparams(torch.randn(3), 2, QuantScheme.AFFINE, Granularity.PER_TENSOR)
    with pytest.raises(FormatError, match="padding"):
        fused.dequantize_packed(dirty, qp, 3, None)
    with pytest.raises(FormatError, match="need"):
        fused.dequantize_packed(packed, qp, 40, None)


# ---------------------------------------------------------------------- selection
BIG = fused.SAMPLE_ABOVE + 12_345


def _big(seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BIG, generator=g).to(dtype)


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99, 0.3333])
def test_magnitude_indices_equal_the_reference(sparsity: float) -> None:
    x = _big(int(sparsity * 1000))
    assert torch.equal(fused.magnitude_indices(x, sparsity), pruning.magnitude_indices(x, sparsity))


def test_magnitude_indices_sampled_path_is_exact() -> None:
    # The band path itself (not the fallback) gives the reference's set.
    x = _big(7).reshape(-1, 1)
    prune = pruning.count_to_prune(x.numel(), 0.9)
    found = fused_select._sampled_indices(x.reshape(-1), prune)
    assert found is not None
    assert torch.equal(found, pruning.magnitude_indices(x, 0.9))


def test_the_band_also_selects_tensors_smaller_than_its_sample() -> None:
    # A device tensor above HOST_BELOW values selects through the band even when its
    # sample (with replacement) is larger than the tensor.
    exact = 0
    for n, seed in ((fused.HOST_BELOW + 1, 1), (100_000, 2), (300_000, 3)):
        x = torch.randn(n, generator=torch.Generator().manual_seed(seed)).double()
        for sparsity in (0.5, 0.9, 0.99):
            found = fused_select._sampled_indices(x, pruning.count_to_prune(n, sparsity))
            if found is not None:  # None: the band missed (the host decides)
                assert torch.equal(found, pruning.magnitude_indices(x, sparsity))
                exact += 1
    assert exact >= 8


def test_magnitude_indices_odd_inputs() -> None:
    for t in (torch.empty(0), torch.tensor([3.0]), torch.randn(5, 4), torch.randn(100).half()):
        for sparsity in (0.0, 0.5, 1.0):
            assert torch.equal(
                fused.magnitude_indices(t, sparsity), pruning.magnitude_indices(t, sparsity)
            )
    m = _big(2)[: BIG // 5 * 5].reshape(-1, 5).t()  # non-contiguous
    assert not m.is_contiguous()
    assert torch.equal(fused.magnitude_indices(m, 0.9), pruning.magnitude_indices(m, 0.9))
    half = _big(4, torch.float16)
    assert torch.equal(fused.magnitude_indices(half, 0.9), pruning.magnitude_indices(half, 0.9))
    with pytest.raises(ValueError, match="floating"):
        fused.magnitude_indices(torch.ones(3, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="sparsity"):
        fused.magnitude_indices(torch.ones(3), 1.5)


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("rounding", ["bf16", "fp16", "grid"])
def test_ties_across_the_cut_are_settled_on_the_device(sparsity: float, rounding: str) -> None:
    # Ties at the cut (common in large fp32 tensors, the rule in bf16-born weights): the
    # band path itself drops the lowest indices first, as the reference does.
    x = _big(int(sparsity * 100) + len(rounding))
    if rounding == "grid":
        x = torch.round(x * 512) / 512  # about 2,000 levels in the band's range
    else:
        x = x.to(getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[rounding])).float()
    prune = pruning.count_to_prune(BIG, sparsity)
    expected = pruning.magnitude_indices(x, sparsity)
    cut = x.abs().sort().values[prune - 1]
    assert int((x.abs() == cut).sum()) > 1  # a tie at the cut indeed
    found = fused_select._sampled_indices(x, prune)
    assert found is not None and torch.equal(found, expected)
    assert torch.equal(fused.magnitude_indices(x, sparsity), expected)


@pytest.mark.parametrize("n", [1_060_921, 4096 * 257, 2048 * 513, 512 * 2047, 16384 * 65])
def test_the_band_pass_counts_by_rows_as_over_the_whole(n: int) -> None:
    width = fused_select.row_width(n)
    assert n % width == 0 and (width == n or width in fused_select._ROW_WIDTHS)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n % 97))
    lo, hi = torch.tensor(0.5), torch.tensor(1.5)
    n_above, n_band, above, band = fused_select._band_pass(x, lo, hi)
    mags = x.abs()
    assert torch.equal(above, mags > hi) and torch.equal(band, (mags >= lo) & (mags <= hi))
    assert int(n_above) == int((mags > hi).sum()) and int(n_band) == int(band.sum())


_TRITON_CHECK = """
import torch
from fedsqueeze.codec import fused_select, pruning, triton_select
triton_select.set_enabled(True)
n = fused_select.SAMPLE_ABOVE + 12_345
for seed, rounding in enumerate(("none", "bf16", "grid", "fp16")):
    x = torch.randn(n, generator=torch.Generator().manual_seed(40 + seed))
    if rounding == "grid":
        x = torch.round(x * 512) / 512
    elif rounding == "bf16":
        x = x.to(torch.bfloat16).float()
    elif rounding == "fp16":
        x = x.half()
    for sparsity in (0.5, 0.9, 0.99):
        assert triton_select.usable(x)
        prune = pruning.count_to_prune(n, sparsity)
        found = fused_select._sampled_indices(x, prune)
        assert found is not None, (rounding, sparsity)
        assert torch.equal(found, pruning.magnitude_indices(x, sparsity)), (rounding, sparsity)
print("triton selection: equal")
"""


@pytest.mark.timeout(300)
def test_the_triton_selection_equals_the_reference() -> None:
    # The two Triton kernels through Triton's interpreter on CPU tensors, in a process
    # of their own (Triton reads TRITON_INTERPRET when first imported); ties at the cut
    # (bf16-, grid- and fp16-rounded values) included. On a GPU, make gpu-check compares
    # them. Skipped where Triton is not installed.
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True, text=True,
        timeout=280,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "triton selection: equal" in done.stdout


def test_a_failing_triton_selection_leaves_it_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_select, "_load", lambda: {})  # "Triton is there"

    def broken(*args: object) -> None:
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(triton_select, "_indices", broken)
    triton_select.set_enabled(True)
    try:
        x = _big(44)
        assert triton_select.usable(x)
        found = fused.magnitude_indices(x, 0.9)
        assert torch.equal(found, pruning.magnitude_indices(x, 0.9))
        assert not triton_select.enabled() and not triton_select.usable(x)  # off for good
    finally:
        triton_select.set_enabled(None)
    with pytest.raises(TypeError):
        triton_select.set_enabled("yes")  # type: ignore[arg-type]
    monkeypatch.setenv(triton_select.ENV, "1")
    assert triton_select.enabled()
    monkeypatch.delenv(triton_select.ENV)
    assert not triton_select.enabled() and not triton_select.usable(x)


def test_ties_wider_than_the_band_take_the_reference() -> None:
    x = _big(5)
    x[: BIG // 2] = 0.0  # half the values tied at zero, the cut among them
    flat = x.reshape(-1)
    assert fused_select._sampled_indices(flat, pruning.count_to_prune(BIG, 0.3)) is None
    assert torch.equal(fused.magnitude_indices(x, 0.3), pruning.magnitude_indices(x, 0.3))
    ties = torch.round(_big(6) * 4) / 4  # few distinct values: ties at a nonzero cut
    assert torch.equal(fused.magnitude_indices(ties, 0.9), pruning.magnitude_indices(ties, 0.9))


def test_a_missed_band_takes_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _big(8)
    prune = pruning.count_to_prune(BIG, 0.9)
    # A band far too narrow: the cut falls outside it.
    monkeypatch.setattr(fused_select, "band_ranks", lambda n, p, s=0: (100, 101))
    assert fused_select._sampled_indices(x, prune) is None
    assert torch.equal(fused.magnitude_indices(x, 0.9), pruning.magnitude_indices(x, 0.9))


def test_nan_in_a_pruned_tensor_matches_the_reference() -> None:
    x = _big(9)
    x[[5, 500, 50_000]] = float("nan")
    assert torch.equal(fused.magnitude_indices(x, 0.9), pruning.magnitude_indices(x, 0.9))


# ---------------------------------------------------------------------- the hooks
def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "big.weight": torch.randn(1100, 1000, generator=g) * 0.02,  # sampled pruning
        "fc.weight": torch.randn(64, 129, generator=g),
        "fc.bias": torch.randn(64, generator=g),
        "odd.weight": torch.randn(7, 13, generator=g),
        "steps": torch.tensor(5),
    }


HOOK_SPECS = (
    "quant=8",
    "quant=8:channel",
    "quant=4:nf4",
    "quant=4:nf4:block64:bf16",
    "quant=4:symmetric:block32",
    "quant=3:block96",
    "quant=8:block64:dq",
    "prune=l1:0.9,quant=4:nf4",
    "prune=l1:0.9,quant=8",
    "topk=0.01,quant=8",
    "topk=0.01,quant=4:block64",
    "rank=8,quant=8",
)


@pytest.mark.parametrize("text", HOOK_SPECS)
def test_encoder_hook_gives_the_same_bytes(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = parse_spec(text)
    state = _state(1)
    base = {k: (v * 0.9 if v.is_floating_point() else v) for k, v in _state(2).items()}
    reference = encode_state(state, spec, base).to_bytes()
    ref_decoded = decode_state(encode_state(state, spec, base), base)
    monkeypatch.setattr(fused, "DEVICE_TYPES", {"cpu", "cuda"})
    encoded = encode_state(state, spec, base)
    assert encoded.to_bytes() == reference
    decoded = decode_state(encoded, base)
    for name, t in ref_decoded.items():
        assert torch.equal(decoded[name], t), name


def test_decoder_hook_takes_the_same_values(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = parse_spec("quant=4:nf4")
    encoded = encode_state(_state(3), spec)
    expected = decode_state(encoded)
    monkeypatch.setattr(fused, "DEVICE_TYPES", {"cpu"})
    got = decode_state(encoded)
    for name, t in expected.items():
        assert torch.equal(got[name], t), name


def test_error_feedback_residual_is_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedsqueeze.codec.tensor_encode import TensorEncoder

    spec = parse_spec("quant=4:block64,topk=0.1")
    state = _state(4)
    ref = TensorEncoder(spec, None, None, None)
    rec_ref, res_ref = ref.encode("fc.weight", state["fc.weight"], None)
    monkeypatch.setattr(fused, "DEVICE_TYPES", {"cpu"})
    hot = TensorEncoder(spec, None, None, None)
    rec, res = hot.encode("fc.weight", state["fc.weight"], None)
    assert rec.body == rec_ref.body
    assert res is not None and res_ref is not None and torch.equal(res, res_ref)


# ---------------------------------------------------------------------- compile
def test_compile_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fused.COMPILE_ENV, raising=False)
    fused.set_compile(None)
    assert not fused.compile_enabled()
    monkeypatch.setenv(fused.COMPILE_ENV, "1")
    assert fused.compile_enabled()
    fused.set_compile(False)
    assert not fused.compile_enabled()
    fused.set_compile(None)
    with pytest.raises(TypeError):
        fused.set_compile("yes")  # type: ignore[arg-type]


def test_a_failing_compiler_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn: object, **kwargs: object) -> object:
        def call(*args: object) -> object:
            raise RuntimeError("no compiler here")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(fused_compile, "_compiled", {})
    fused.set_compile(True)
    try:
        _check_equal(_values(5000, 1), QuantSpec(8))
        # Each kernel that failed runs eager from then on; the switch itself stays on.
        assert fused_compile.failed_kernels() == {"_qpack_linear", "_deq_linear"}
        assert fused.compile_enabled()
    finally:
        fused.set_compile(None)


def test_compiled_kernels_get_tensors_and_fix_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    # Widths and bounds are constants of each compiled form (a symbolic ``bits`` broke
    # ``1 << bits`` under torch 2.11 on CUDA); the NF4 kernel, which divides, is compiled
    # with eager's rounding of the division where this torch has that setting.
    compiled: list[dict[str, object]] = []
    codes: list[object] = []

    def recording(fn: Callable[..., object], **kwargs: object) -> Callable[..., object]:
        compiled.append(kwargs)
        codes.append(fn.__code__)
        # A source file to show: torch 2.11 wraps a function without one in its shared
        # ``inner`` frame, which brought back the one-code-object recompile limit.
        assert inspect.getsourcefile(fn) == fn.__code__.co_filename
        assert inspect.getsource(fn).startswith(f"def {fn.__name__}(")

        def run(*args: object) -> object:
            assert all(isinstance(a, torch.Tensor) for a in args)
            assert fn.__code__.co_argcount == len(args)  # the constants are literals
            return fn(*args)

        return run

    monkeypatch.setattr(torch, "compile", recording)
    monkeypatch.setattr(fused_compile, "_compiled", {})
    fused.set_compile(True)
    try:
        for bits in (8, 4):
            _check_equal(_values(5000, bits), QuantSpec(bits))
        _check_equal(_values(5000, 3), QuantSpec(4, QuantScheme.NF4))
        assert fused.compile_enabled()
    finally:
        fused.set_compile(None)
    forms = [key for key in fused_compile._compiled]
    assert {"_qpack_linear", "_deq_linear", "_qpack_nf4"} <= {name for name, _ in forms}
    assert len([name for name, _ in forms if name == "_qpack_linear"]) == 2  # 8 and 4 bits
    setting = fused_compile.division_setting()
    assert setting is not None  # this torch has it
    assert {"dynamic": True, "options": {setting: True}} in compiled
    # One code object per form: dynamo's recompile limit and its memory of which
    # constants changed are per code object (a shared one made ``bits`` symbolic).
    assert len(set(codes)) == len(codes) == len(forms)
    # The widths are literals of each form's code (a closure's int was traced as a
    # symbolic size under torch 2.11), e.g. 4 bits and rows of 1024 for the 4-bit decode.
    deq4 = [c for c in codes if c.co_name.startswith("_deq_linear_4_1024_")]  # type: ignore[attr-defined]
    assert len(deq4) == 1 and {4, 1024} <= set(deq4[0].co_consts)  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_equals_eager() -> None:
    fused.set_compile(True)
    try:
        for q in (
            QuantSpec(8),
            QuantSpec(4, QuantScheme.NF4, Granularity.PER_BLOCK, block_size=64),
            QuantSpec(3, QuantScheme.SYMMETRIC, Granularity.PER_BLOCK, block_size=32),
            # The one-kernel runs (range, parameters, codes) in each scale format.
            QuantSpec(4, QuantScheme.AFFINE, Granularity.PER_BLOCK, block_size=64,
                      scale_format=ScaleFormat.BF16),
            QuantSpec(8, QuantScheme.SYMMETRIC, Granularity.PER_BLOCK, block_size=128,
                      scale_format=ScaleFormat.FP32),
            QuantSpec(2, QuantScheme.AFFINE, Granularity.PER_BLOCK, block_size=32),
        ):  # fmt: skip
            for n in (4096, 70_001):
                _check_equal(_values(n, n % 7), q)
        x = _big(12)
        for sparsity in (0.9, 0.99):  # 0.99: a float32 tie at the cut
            expected = pruning.magnitude_indices(x, sparsity)
            assert torch.equal(fused.magnitude_indices(x, sparsity), expected)
        found = fused_select._sampled_indices(x, pruning.count_to_prune(BIG, 0.9))
        assert found is not None and torch.equal(found, pruning.magnitude_indices(x, 0.9))
        if fused_compile.failed_kernels():
            pytest.skip("torch.compile is not available here (the eager path was checked)")
    finally:
        fused.set_compile(None)


# ---------------------------------------------------------------------- CUDA
@gpu
@needs_cuda
@pytest.mark.parametrize("q", _specs()[::3], ids=str)
def test_cuda_equals_cpu_reference(q: QuantSpec) -> None:
    for i, n in enumerate(SIZES):
        _check_equal(_values(n, seed=i), q, device="cuda")


@gpu
@needs_cuda
def test_cuda_magnitude_indices_equal_cpu() -> None:
    x = _big(11)
    for sparsity in (0.9, 0.99):
        got = fused.magnitude_indices(x.cuda(), sparsity).cpu()
        assert torch.equal(got, pruning.magnitude_indices(x, sparsity))


@gpu
@needs_cuda
@pytest.mark.parametrize("text", HOOK_SPECS)
def test_cuda_encode_state_equals_cpu(text: str) -> None:
    spec = parse_spec(text)
    state = _state(1)
    expected = encode_state(state, spec).to_bytes()
    on_gpu = {k: v.cuda() for k, v in state.items()}
    assert encode_state(on_gpu, spec).to_bytes() == expected
