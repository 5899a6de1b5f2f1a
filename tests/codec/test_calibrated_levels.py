"""Progressive streams whose codes GPTQ chose: ordinary streams, every prefix decodes,
and the output error on the calibration inputs is below nearest rounding's."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedsqueeze.codec import decode_prefix, decode_state, encode_state, smallest_prefix
from fedsqueeze.codec.gptq import output_error
from fedsqueeze.codec.model import EncodedModel
from fedsqueeze.codec.nested_gptq import Calibration
from fedsqueeze.codec.spec_text import parse_spec

SPECS = (
    "quant=8:symmetric:block32:dq:hadamard,levels=2+1+1+1+1+2",
    "quant=8:channel,levels=2+2+4",
)


def _case(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {
        "lin.weight": torch.randn(24, 64, generator=g),
        "lin.bias": torch.randn(24, generator=g),
        "emb.weight": torch.randn(40, 64, generator=g),
    }
    x = torch.randn(400, 64, generator=g) @ torch.randn(64, 64, generator=g)
    return state, (x.T @ x).double()


def _prefix_errors(
    encoded: EncodedModel, w: torch.Tensor, h: torch.Tensor
) -> tuple[list[float], dict[str, torch.Tensor]]:
    stream = encoded.to_bytes()[:-4]
    start = smallest_prefix(encoded)
    errors = []
    for size in [*range(start, len(stream), max(1, (len(stream) - start) // 12)), len(stream)]:
        state = decode_prefix(stream[:size]).state
        errors.append(output_error(w.double(), state["lin.weight"].double(), h))
    return errors, decode_state(EncodedModel.from_bytes(encoded.to_bytes()))


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize("seed", range(2))
def test_calibrated_stream_decodes_without_the_calibration_and_errs_less(
    text: str, seed: int
) -> None:
    state, h = _case(seed)
    spec = parse_spec(text)
    w = state["lin.weight"]
    plain = encode_state(state, spec, seed=0)
    calibrated = encode_state(
        state, spec, seed=0, calibration=Calibration(hessians={"lin.weight": h}, margin=2)
    )
    # same records, same sizes: only the codes of the calibrated tensor differ
    assert [r.name for r in plain.records] == [r.name for r in calibrated.records]
    assert abs(calibrated.nbytes - plain.nbytes) < 0.1 * plain.nbytes
    _, plain_state = _prefix_errors(plain, w, h)
    cal_errors, cal_state = _prefix_errors(calibrated, w, h)
    assert torch.equal(cal_state["emb.weight"], plain_state["emb.weight"])
    assert torch.equal(cal_state["lin.bias"], plain_state["lin.bias"])
    # the first level of the calibrated tensor errs less on the calibration inputs
    p_first = _first_level_error(plain, w, h)
    c_first = _first_level_error(calibrated, w, h)
    assert c_first < p_first
    # the whole stream is close to the nearest-rounded one (each code within 2 of it)
    assert not torch.equal(cal_state["lin.weight"], plain_state["lin.weight"])
    rel = (cal_state["lin.weight"] - w).norm() / w.norm()
    assert float(rel) < 0.03
    assert len(cal_errors) >= 2
    # the output error on the calibration inputs never rises as the prefix grows
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(cal_errors)), cal_errors


def _first_level_error(encoded: EncodedModel, w: torch.Tensor, h: torch.Tensor) -> float:
    stream = encoded.to_bytes()[:-4]
    state = decode_prefix(stream[: smallest_prefix(encoded)]).state
    return output_error(w.double(), state["lin.weight"].double(), h)


def test_margin_zero_is_nearest_rounding() -> None:
    state, h = _case(5)
    spec = parse_spec(SPECS[0])
    plain = encode_state(state, spec, seed=0).to_bytes()
    zero = encode_state(
        state, spec, seed=0, calibration=Calibration(hessians={"lin.weight": h}, margin=0)
    ).to_bytes()
    assert plain == zero


def test_bad_calibration_raises() -> None:
    state, h = _case(0)
    spec = parse_spec(SPECS[0])
    with pytest.raises(ValueError):
        Calibration(hessians={"lin.weight": h[:3]})
    with pytest.raises(ValueError):
        Calibration(hessians={"lin.weight": h}, margin=-1)
    with pytest.raises(ValueError):
        encode_state(state, spec, calibration=Calibration(hessians={"lin.weight": h[:8, :8]}))
    with pytest.raises(TypeError):
        encode_state(state, spec, calibration={"lin.weight": h})  # type: ignore[arg-type]
