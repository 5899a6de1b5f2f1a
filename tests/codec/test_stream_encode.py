"""Streaming encode: the bytes of encode_state, on any number of workers; global cut-off."""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.codec import NonFinite, encode_state
from fedsqueeze.codec.global_cut import find_global_cut
from fedsqueeze.codec.pruning import global_magnitude_masks
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.codec.stream_encode import encode_stream, plan_parts
from fedsqueeze.errors import NonFiniteError

SPECS = [
    "lossless",
    "fp16",
    "int8",
    "quant=8:affine:channel:stochastic",
    "quant=4:symmetric:block64",
    "quant=4:nf4:block64",
    "prune90-int4",
    "prune95-kmeans3",
    "topk10-int4",
    "rank=4,quant=8",
    "quant=8,levels=2+2+4",
    "quant=4,levels=2+2",
    "prune=global:0.8,quant=8",
    "quant=8:channel:hadamard,levels=2+2+4",
    "quant=4:block64:dq:hadamard",
]


class _Bodies:
    """An in-memory RecordStore."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def put(self, body: bytes | memoryview) -> int:
        self.bodies.append(bytes(body))
        return len(self.bodies) - 1


def _streamed(state: dict[str, torch.Tensor], text: str, **kwargs: object) -> bytes:
    store = _Bodies()
    plan = encode_stream(state, parse_spec(text), store, **kwargs)  # type: ignore[arg-type]
    data = b"".join(plan_parts(plan, lambda r: store.bodies[r.token]))
    out = data + (zlib.crc32(data) & 0xFFFFFFFF).to_bytes(4, "little")
    assert len(out) == plan.nbytes
    return out


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {f"l{i}.weight": torch.randn(96, 50 + 10 * i, generator=g) for i in range(4)}
    state.update({f"l{i}.bias": torch.randn(96, generator=g) for i in range(4)})
    state["h.weight"] = torch.randn(10, 96, generator=g).half()
    state["steps"] = torch.tensor(5 + seed)
    state["flags"] = torch.tensor([True, False])
    return state


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize("delta", [False, True])
def test_bytes_are_encode_states_on_any_number_of_workers(text: str, delta: bool) -> None:
    state = _state(0)
    other = {k: v + 0 if not v.is_floating_point() else v * 0.9 for k, v in state.items()}
    base = other if delta else None
    expected = encode_state(state, parse_spec(text), base, seed=3).to_bytes()
    for workers in (1, 2, 4):
        # a small in-flight budget: one tensor at a time, results still in order
        got = _streamed(state, text, base=base, seed=3, workers=workers, inflight_bytes=1)
        assert got == expected, f"{workers} workers"
    assert _streamed(state, text, base=base, seed=3, workers=3) == expected


def test_residuals_are_handed_over_as_encode_state_returns_them() -> None:
    state = _state(1)
    encoded = encode_state(state, parse_spec("topk10-int4"), seed=0)
    kept: dict[str, torch.Tensor] = {}
    _streamed(state, "topk10-int4", keep_residual=kept.__setitem__, workers=2, seed=0)
    assert encoded.residual is not None and set(kept) == set(encoded.residual)
    assert all(torch.equal(kept[n], encoded.residual[n]) for n in kept)


def test_nonfinite_refused_or_carried_like_encode_state() -> None:
    state = _state(2)
    state["l2.weight"][3, 4] = float("nan")
    for text in ("int8", "prune=global:0.5,quant=8"):
        with pytest.raises(NonFiniteError, match=r"l2\.weight"):
            _streamed(state, text, workers=2)
        carried = encode_state(state, parse_spec(text), nonfinite=NonFinite.CARRY)
        got = _streamed(state, text, workers=2, nonfinite=NonFinite.CARRY)
        assert got == carried.to_bytes()


@pytest.mark.parametrize("text", ["quant=4:block64", "quant=8:channel"])
def test_a_bad_block_is_refused_or_carried_by_the_compiled_pass(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks and rows checked inside the compiled quantization pass (small thresholds
    put these tensors there): refused or carried as encode_state does."""
    from fedsqueeze.codec import dense_encode, jit

    if not jit.ready():
        pytest.skip("numba is not importable here")
    monkeypatch.setattr(jit, "MIN_VALUES", 1)
    monkeypatch.setattr(dense_encode, "PIPELINE_ABOVE", 64)
    state = _state(3)
    state["l2.weight"][3, 4] = float("nan")
    with pytest.raises(NonFiniteError, match=r"l2\.weight"):
        _streamed(state, text, workers=2)
    carried = encode_state(state, parse_spec(text), nonfinite=NonFinite.CARRY)
    assert _streamed(state, text, workers=2, nonfinite=NonFinite.CARRY) == carried.to_bytes()


def test_bad_arguments_are_caller_errors() -> None:
    with pytest.raises(ValueError, match="workers"):
        _streamed(_state(0), "int8", workers=0)
    with pytest.raises(ValueError, match="inflight_bytes"):
        _streamed(_state(0), "int8", inflight_bytes=0)
    with pytest.raises(TypeError, match="CodecSpec"):
        encode_stream(_state(0), "int8", _Bodies())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="LevelOrder"):
        _streamed(_state(0), "quant=8,levels=4+4", order="relative")


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=5),
    sparsity=st.floats(0.0, 1.0),
    levels=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_global_cut_is_the_in_memory_masks_ties_included(
    sizes: list[int], sparsity: float, levels: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    # few distinct magnitudes: many ties at the cut-off
    tensors = {
        f"t{i}": torch.randint(-levels, levels + 1, (n,), generator=g).float() / 7
        for i, n in enumerate(sizes)
    }
    cut = find_global_cut(tensors, lambda n: tensors[n], sparsity)
    masks = {n: cut.mask(n, t) for n, t in tensors.items()}
    reference = global_magnitude_masks(tensors, sparsity)
    # One tie rule on both paths (the first tied values in state order go): the same masks.
    for name in tensors:
        assert torch.equal(masks[name], reference[name]), name
    kept = torch.cat([tensors[n][masks[n]].abs() for n in tensors])
    dropped = torch.cat([tensors[n][~masks[n]].abs() for n in tensors])
    if kept.numel() and dropped.numel():
        assert float(dropped.max()) <= float(kept.min())


@pytest.mark.parametrize("text", ["prune=global:0.6,quant=8", "prune=l1:0.5,quant=4"])
def test_streamed_bytes_are_encode_states_with_ties_at_the_cut(text: str) -> None:
    """Values on a coarse grid tie at every cut: the streaming encoder's radix cut and
    encode_state's selection keep the same tied values, so the bytes agree."""
    g = torch.Generator().manual_seed(3)
    state = {
        f"l{i}.weight": torch.randint(-6, 7, (64, 40 + 8 * i), generator=g).float() / 8
        for i in range(3)
    }
    assert _streamed(state, text, workers=2) == encode_state(state, parse_spec(text)).to_bytes()


def test_global_cut_equals_in_memory_masks_without_ties() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.randperm(20_000, generator=g).float() + 1
    values = values * torch.where(torch.rand(20_000, generator=g) < 0.5, -1.0, 1.0)
    tensors = dict(zip(("a", "b", "c"), torch.split(values, [5_000, 12_000, 3_000]), strict=True))
    for sparsity in (0.0, 0.1, 0.5, 0.93, 1.0):
        cut = find_global_cut(tensors, lambda n: tensors[n], sparsity)
        reference = global_magnitude_masks(tensors, sparsity)
        for name, t in tensors.items():
            assert torch.equal(cut.mask(name, t), reference[name])
