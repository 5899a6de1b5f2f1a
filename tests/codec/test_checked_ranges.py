"""The encoder's check reads the ranges the quantizer needs (per tensor, per row for
per-channel specs, per block for block-wise ones): one pass for both, the same bytes as
two, and the same refusals."""

from __future__ import annotations

import pytest
import torch

from fedsqueeze.codec import NonFinite, decode_state, encode_state, tensor_encode
from fedsqueeze.codec.kernels import Runs, value_range
from fedsqueeze.codec.quantization import choose_qparams
from fedsqueeze.codec.spec import Granularity, QuantScheme
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.errors import NonFiniteError

SPECS = [
    "quant=8:channel",
    "quant=4:channel:symmetric",
    "quant=8:channel:hadamard",
    "quant=4:block64",
    "quant=4:nf4:block64:dq",
    "quant=8:block128:symmetric:bf16",
    "quant=4:block256:hadamard",
]


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "big.weight": torch.randn(300, 256, generator=g) * 3,
        "short.weight": torch.randn(40, 16, generator=g),  # rows of 16: not kept
        "bias": torch.randn(300, generator=g),
    }


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("delta", [False, True])
def test_kept_row_ranges_give_the_bytes_of_a_second_pass(
    spec: str, delta: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    state, base = _state(0), (_state(1) if delta else None)
    kept: list[str] = []
    runs = tensor_encode.TensorEncoder._dense_runs

    def counted(self: tensor_encode.TensorEncoder, t: torch.Tensor) -> Runs | None:
        got = runs(self, t)
        if got is not None:
            kept.append(str(tuple(t.shape)))
        return got

    monkeypatch.setattr(tensor_encode.TensorEncoder, "_dense_runs", counted)
    reused = encode_state(state, parse_spec(spec), base).to_bytes()
    # Rows of 256 keep their ranges, rows of 16 do not; blocks of 64 and more, in both
    # (checked on the worker threads: in either order).
    assert sorted(kept) == (["(300, 256)"] if "channel" in spec else ["(300, 256)", "(40, 16)"])
    monkeypatch.setattr(tensor_encode, "_RUNS_FROM", 1 << 30)
    alone = encode_state(state, parse_spec(spec), base).to_bytes()
    assert reused == alone


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("spec", ["quant=8:channel", "quant=4:block64"])
def test_a_run_with_a_non_finite_value_is_refused_or_carried(bad: float, spec: str) -> None:
    state = _state(2)
    state["big.weight"][123, 45] = bad
    with pytest.raises(NonFiniteError, match=r"big\.weight"):
        encode_state(state, parse_spec(spec))
    got = decode_state(encode_state(state, parse_spec(spec), nonfinite=NonFinite.CARRY))
    w = state["big.weight"]
    assert torch.equal(got["big.weight"].isnan(), w.isnan())
    assert torch.equal(got["big.weight"].nan_to_num(), w.nan_to_num())


def test_choose_qparams_takes_known_row_ranges_of_the_right_size() -> None:
    x = torch.randn(64 * 10, generator=torch.Generator().manual_seed(3))
    runs = Runs(64)
    known = value_range(x, runs)
    args = (x, 8, QuantScheme.AFFINE, Granularity.PER_CHANNEL, runs, 10)
    with_known = choose_qparams(*args, known_range=known)
    without = choose_qparams(*args)
    assert torch.equal(with_known.scale, without.scale)
    assert torch.equal(with_known.zero_point, without.zero_point)
    with pytest.raises(ValueError, match="known_range must hold 10 minima and maxima"):
        choose_qparams(*args, known_range=(known[0][:9], known[1][:9]))
    channels = torch.arange(640) // 64  # per value, not runs
    with pytest.raises(ValueError, match="known_range is for per-tensor quantization or runs"):
        choose_qparams(
            x, 8, QuantScheme.AFFINE, Granularity.PER_CHANNEL, channels, 10, known_range=known
        )
