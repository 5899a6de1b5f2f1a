"""The per-tensor range found by TensorEncoder.problem() is reused by encode() (one pass
over the tensor fewer) only for the very tensor it was found on, unchanged."""

from __future__ import annotations

import pytest
import torch

from fedsqueeze.codec import quantization
from fedsqueeze.codec.finite import NonFinite
from fedsqueeze.codec.kernels import value_range
from fedsqueeze.codec.model import encode_state
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.codec.tensor_encode import TensorEncoder


def record_bytes(encoder: TensorEncoder, name: str, t: torch.Tensor) -> bytes:
    record, _ = encoder.encode(name, t, None)
    return record.to_bytes()


def fresh(spec_text: str, name: str, t: torch.Tensor) -> bytes:
    return record_bytes(TensorEncoder(parse_spec(spec_text), None, None, None), name, t)


@pytest.mark.parametrize("spec_text", ["int8", "int4", "quant=8:symmetric", "quant=4:block64"])
def test_problem_then_encode_gives_the_same_bytes(spec_text: str) -> None:
    t = torch.randn(300, 70, generator=torch.Generator().manual_seed(1))
    encoder = TensorEncoder(parse_spec(spec_text), None, None, None)
    assert encoder.problem("l.weight", t.detach()) is None
    assert record_bytes(encoder, "l.weight", t.detach()) == fresh(spec_text, "l.weight", t)


def test_the_range_is_reused_once(monkeypatch: pytest.MonkeyPatch) -> None:
    t = torch.randn(300, 70, generator=torch.Generator().manual_seed(2))
    calls: list[int] = []

    def counted(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return value_range(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(quantization, "value_range", counted)
    encoder = TensorEncoder(parse_spec("int8"), None, None, None)
    assert encoder.problem("l.weight", t.detach()) is None
    record_bytes(encoder, "l.weight", t.detach())
    assert calls == []  # the quantizer took problem()'s range
    record_bytes(encoder, "l.weight", t.detach())
    assert calls == [1]  # forgotten after one use


def test_a_tensor_changed_in_place_gets_its_new_range() -> None:
    t = torch.randn(300, 70, generator=torch.Generator().manual_seed(3))
    encoder = TensorEncoder(parse_spec("int8"), None, None, None)
    assert encoder.problem("l.weight", t.detach()) is None
    t.mul_(5.0)  # bumps the version counter the detached views share
    assert record_bytes(encoder, "l.weight", t.detach()) == fresh("int8", "l.weight", t)


def test_another_tensor_under_the_same_name_gets_its_own_range() -> None:
    g = torch.Generator().manual_seed(4)
    t, u = torch.randn(300, 70, generator=g), torch.randn(300, 70, generator=g) * 3
    encoder = TensorEncoder(parse_spec("int8"), None, None, None)
    assert encoder.problem("l.weight", t) is None
    assert record_bytes(encoder, "l.weight", u) == fresh("int8", "l.weight", u)


def test_nonfinite_tensors_are_still_reported() -> None:
    t = torch.randn(50, 20)
    t[3, 4] = float("inf")
    encoder = TensorEncoder(parse_spec("int8"), None, None, None)
    assert encoder.problem("l.weight", t) is not None
    state = {"l.weight": t}
    carried = encode_state(state, parse_spec("int8"), nonfinite=NonFinite.CARRY)
    assert carried.records[0].quant is None
