"""The two-pass magnitude selection (fedsqueeze.codec.threshold_select): the kept set
is exactly the reference mask's (torch.nn.utils.prune's where no tie straddles the cut;
ties at the cut: lowest indices dropped first), with its values; ties, zeros, a missed
band and both threads handled."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.codec import pruning, threshold_select
from fedsqueeze.codec.pruning import count_to_prune, magnitude_mask
from fedsqueeze.codec.threshold_select import select_above, tie_rule


def stable_kept(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The tie rule spelled out: a stable ascending sort of the magnitudes, the first
    ``count_to_prune`` dropped; the kept indices, increasing."""
    prune = count_to_prune(x.numel(), sparsity)
    order = torch.sort(x.abs().reshape(-1), stable=True).indices
    return torch.sort(order[prune:]).values


def tensor(n: int, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    if kind == "ties":  # few distinct magnitudes: ties straddle every cut
        x = torch.randint(-3, 4, (n,), generator=g).to(torch.float32)
    elif kind == "zeros":
        x[: n // 2] = 0.0
    elif kind == "wide":  # values over many octaves, signed zeros, subnormals
        x = x * torch.exp2(torch.randint(-140, 120, (n,), generator=g).to(torch.float32))
        x[::11] = -0.0
    return x


@contextlib.contextmanager
def sampled_path() -> Iterator[None]:
    """The sampled path from 101 values, in chunks of 97 on two threads."""
    saved = pruning._SAMPLE_ABOVE, pruning._SAMPLE_SIZE, threshold_select.CHUNK
    threads = torch.get_num_threads()
    pruning._SAMPLE_ABOVE, pruning._SAMPLE_SIZE, threshold_select.CHUNK = 100, 64, 97
    torch.set_num_threads(2)
    try:
        yield
    finally:
        pruning._SAMPLE_ABOVE, pruning._SAMPLE_SIZE, threshold_select.CHUNK = saved
        torch.set_num_threads(threads)


@pytest.fixture
def sampled() -> Iterator[None]:
    with sampled_path():
        yield


@settings(max_examples=60, deadline=None)
@given(
    st.integers(101, 4000),
    st.sampled_from([0.001, 0.1, 0.5, 0.9, 0.999]),
    st.sampled_from(["normal", "ties", "zeros", "wide"]),
    st.integers(0, 2**31),
)
def test_kept_set_is_the_reference_mask(n: int, sparsity: float, kind: str, seed: int) -> None:
    x = tensor(n, kind, seed)
    with sampled_path():
        # The mask's own sampled path (ties broken by topk inside the same band).
        reference = torch.nonzero(magnitude_mask(x, sparsity)).view(-1)
        indices, values = pruning.magnitude_selection(x, sparsity)
    if kind == "normal":  # no ties: torch.nn.utils.prune's own set
        assert torch.equal(reference, torch.nonzero(magnitude_mask(x, sparsity)).view(-1))
    assert torch.equal(indices, reference)
    # Every path keeps the tie rule's set: the sampled ones and the small one.
    assert torch.equal(reference, stable_kept(x, sparsity))
    assert torch.equal(torch.nonzero(magnitude_mask(x, sparsity)).view(-1), reference)
    if 0 < count_to_prune(n, sparsity) < n:
        assert values is not None and torch.equal(values, x[reference])
    keep = n - count_to_prune(n, sparsity)
    assert indices.numel() == keep
    exact = torch.sort(x.abs(), descending=True).values[:keep]
    assert torch.equal(torch.sort(x.abs()[indices], descending=True).values, exact)


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "wide"])
def test_same_as_the_single_pass_path(
    sampled: None, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    for seed in range(5):
        x = tensor(3000, kind, seed)
        new = pruning.magnitude_selection(x, 0.9)
        monkeypatch.setattr(pruning, "TWO_PASS", False)
        old = pruning.magnitude_selection(x, 0.9)
        monkeypatch.setattr(pruning, "TWO_PASS", True)
        assert torch.equal(new[0], old[0])
        assert new[1] is not None and old[1] is not None and torch.equal(new[1], old[1])


def test_outcomes() -> None:
    x = torch.arange(1, 1001, dtype=torch.float32).numpy()
    got = select_above(x, 900, 850.0, 950.0)  # exact cut 900: keep 901..1000
    assert got is not None
    assert got[0].tolist() == list(range(900, 1000))
    assert got[1].tolist() == [float(v) for v in range(901, 1001)]
    assert select_above(x, 900, 950.0, 990.0) is None  # band above the cut
    assert select_above(x, 900, 10.0, 850.0) is None  # band below the cut
    got = select_above(x, 900, 901.0, 950.0)  # nothing left to correct: |x| >= lo
    assert got is not None and got[0].tolist() == list(range(900, 1000))
    ties = torch.tensor([1.0] * 10 + [2.0] * 10).numpy()
    got = select_above(ties, 5, 0.5, 1.5)  # half the 1.0s go: the first five
    assert got is not None and got[0].tolist() == list(range(5, 20))


def test_tie_rule_drops_the_lowest_positions_and_counts_nan_largest() -> None:
    band = np.array([3.0, 1.0, 2.0, 1.0, 1.0, 0.5, np.nan, 1.0], dtype=np.float32)
    assert tie_rule(band, 1).tolist() == [5]
    assert tie_rule(band, 3).tolist() == [1, 3, 5]  # two of the four 1.0s: the first two
    assert tie_rule(band, 5).tolist() == [1, 3, 4, 5, 7]
    assert tie_rule(band, 8).tolist() == list(range(8))
    nans = np.array([np.nan, 1.0, np.nan, np.nan], dtype=np.float32)
    assert tie_rule(nans, 2).tolist() == [0, 1]  # NaN largest; of the NaNs, the first
    for still in (0, 9):
        with pytest.raises(ValueError, match=r"still must be in 1\.\.8"):
            tie_rule(band, still)
    before = band.copy()
    tie_rule(band, 4)
    assert np.array_equal(before, band, equal_nan=True)  # the band is left alone


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_ties_across_many_chunks_split_in_one_chunk(sparsity: float) -> None:
    """Few distinct magnitudes: the tied values at the cut fill many chunks, the first
    ones go whole, one chunk drops some and keeps the rest, the later ones keep all."""
    x = tensor(5000, "ties", 3)
    with sampled_path():
        indices, values = pruning.magnitude_selection(x, sparsity)
    want = stable_kept(x, sparsity)
    assert torch.equal(indices, want)
    assert values is not None and torch.equal(values, x[want])


def test_large_tensor_on_default_chunks() -> None:
    x = tensor(1_500_000, "normal", 7)
    for sparsity in (0.1, 0.9, 0.99):
        reference = torch.nonzero(magnitude_mask(x, sparsity)).view(-1)
        indices, values = pruning.magnitude_selection(x, sparsity)
        assert torch.equal(indices, reference)
        assert values is not None and torch.equal(values, x[reference])


def test_first_pass_finds_the_largest_magnitude_nan_and_infinity_above_all() -> None:
    x = tensor(1000, "wide", 5).numpy()
    first = threshold_select.first_pass(x, 0.5, 2.0)
    top = float(np.abs(x).max())
    assert first.within(top) and not first.within(np.nextafter(top, 0.0))
    for bad in (np.inf, -np.inf, np.nan, -np.nan):
        y = x.copy()
        y[777] = bad
        assert not threshold_select.first_pass(y, 0.5, 2.0).within(np.inf)
    assert threshold_select.first_pass(np.zeros(10, np.float32), 0.5, 2.0).within(0.0)
    with pytest.raises(ValueError, match="the first pass saw 1000 values, not 999"):
        threshold_select.finish(x[:999], 10, first)


LARGE = pruning._SAMPLE_ABOVE + 4097  # the two-pass selection's size


@pytest.mark.parametrize("spec", ["prune=l1:0.9,quant=4", "topk=0.1,quant=8"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_large_pruned_tensor_the_path_cannot_hold_is_refused_or_carried(
    spec: str, bad: float
) -> None:
    """The check reads the selection's first pass (no range pass of its own): a value
    that is not finite is still refused before any byte, or carried losslessly under
    ``nonfinite=CARRY``."""
    from fedsqueeze.codec import NonFinite, decode_state, encode_state
    from fedsqueeze.codec.spec_text import parse_spec
    from fedsqueeze.errors import NonFiniteError

    w = tensor(LARGE, "normal", 9)
    w[LARGE - 3] = bad
    state = {"big.weight": w}
    with pytest.raises(NonFiniteError, match=r"big\.weight"):
        encode_state(state, parse_spec(spec))
    carried = decode_state(encode_state(state, parse_spec(spec), nonfinite=NonFinite.CARRY))
    got = carried["big.weight"]
    assert torch.equal(got.isnan(), w.isnan()) and torch.equal(got.nan_to_num(), w.nan_to_num())


@pytest.mark.parametrize("spec", ["prune=l1:0.9,quant=4", "topk=0.1,quant=8", "prune=l1:0.5"])
@pytest.mark.parametrize("delta", [False, True])
def test_the_checks_first_pass_gives_the_bytes_of_a_selection_on_its_own(
    spec: str, delta: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsqueeze.codec import encode_state, tensor_encode
    from fedsqueeze.codec.spec_text import parse_spec

    state = {"big.weight": tensor(LARGE, "ties", 2) / 3 + tensor(LARGE, "normal", 1)}
    base = {"big.weight": tensor(LARGE, "normal", 4)} if delta else None
    reused = encode_state(state, parse_spec(spec), base).to_bytes()
    monkeypatch.setattr(tensor_encode, "prepare_selection", lambda t, s: None)
    alone = encode_state(state, parse_spec(spec), base).to_bytes()
    assert reused == alone
