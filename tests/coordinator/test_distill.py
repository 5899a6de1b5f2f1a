"""Distillation: the loss against a hand computation, training a student, FedDF fusion."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from coordinator.distill import (
    DistillConfig,
    distill,
    distillation_loss,
    ensemble,
    fuse,
    logits_of,
    translate,
)
from fedsqueeze.tasks import DigitsCNN, get_task

QUICK = DistillConfig(epochs=2, batch_size=16, proxy_size=32)


def _gap(
    model: nn.Module, teacher: nn.Module | None, x: torch.Tensor, t: torch.Tensor | None = None
) -> float:
    with torch.no_grad():
        target = logits_of(teacher)(x) if teacher is not None else t
        assert target is not None
        return float(distillation_loss(model(x), target, 4.0))


def _hand_kd(s: list[float], t: list[float], temp: float) -> float:
    """KL(softmax(t/T) ‖ softmax(s/T)) · T² for one row, written out."""
    ps = [math.exp(v / temp) for v in s]
    pt = [math.exp(v / temp) for v in t]
    ps = [v / sum(ps) for v in ps]
    pt = [v / sum(pt) for v in pt]
    return sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True)) * temp**2


def test_loss_matches_a_hand_computation_on_fixed_logits() -> None:
    s = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    t = [[2.0, 0.0, 1.0], [0.5, 0.5, 0.5]]
    for temp in (1.0, 2.0, 4.0):
        want = (_hand_kd(s[0], t[0], temp) + _hand_kd(s[1], t[1], temp)) / 2
        got = distillation_loss(torch.tensor(s), torch.tensor(t), temp)
        assert float(got) == pytest.approx(want, rel=1e-5)


def test_loss_mixes_cross_entropy_with_its_weight() -> None:
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [0.5, 0.5, 0.5]])
    y = torch.tensor([1, 2])
    # cross-entropy by hand: −log softmax(s)[y], batch mean
    ce = sum(-(s[i, y[i]] - torch.logsumexp(s[i], 0)).item() for i in range(2)) / 2
    kd = float(distillation_loss(s, t, 2.0))
    got = float(distillation_loss(s, t, 2.0, labels=y, ce_weight=0.25))
    assert got == pytest.approx(0.75 * kd + 0.25 * ce, rel=1e-5)
    assert float(distillation_loss(s, s, 3.0)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="needs labels"):
        distillation_loss(s, t, 2.0, ce_weight=0.5)


def test_config_refuses_values_it_cannot_use() -> None:
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig(temperature=0.0)
    with pytest.raises(ValueError, match="ce_weight"):
        DistillConfig(ce_weight=1.5)
    with pytest.raises(ValueError, match="shift"):
        DistillConfig(shift=-1)
    with pytest.raises(TypeError, match="shift"):
        DistillConfig(shift=True)


def test_translate_moves_each_image_by_at_most_shift_pixels_with_zero_fill() -> None:
    x = torch.rand(200, 1, 8, 8) + 1.0  # no zeros inside: a zero is fill
    out = translate(x, 1, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    moves = set()
    for i in range(200):
        hits = [
            (dy, dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if torch.equal(out[i], _moved(x[i], dy, dx))
        ]
        assert len(hits) == 1, i
        moves.add(hits[0])
    assert len(moves) == 9  # every offset of the 3 × 3 square is drawn
    assert torch.equal(translate(x, 0, torch.Generator()), x)
    again = translate(x, 1, torch.Generator().manual_seed(0))
    assert torch.equal(again, out)  # the generator alone decides
    with pytest.raises(ValueError, match="images"):
        translate(torch.rand(4, 64), 1, torch.Generator())


def _moved(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``img`` ``[C, H, W]`` moved down by ``dy`` and right by ``dx``, zero fill, by hand."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    for r in range(h):
        for c in range(w):
            if 0 <= r - dy < h and 0 <= c - dx < w:
                out[:, r, c] = img[:, r - dy, c - dx]
    return out


def test_shift_adds_translated_copies_and_is_ignored_for_flat_inputs() -> None:
    task = get_task("digits-cnn")
    assert task.build_student is not None
    x = task.load_data().x_train[:64]
    teacher = logits_of(task.build_model(1))
    base = DistillConfig(epochs=2, batch_size=32)
    plain = distill(task.build_student(0), teacher, x, base).student
    moved = distill(
        task.build_student(0), teacher, x, DistillConfig(epochs=2, batch_size=32, shift=1)
    )
    assert not torch.equal(
        plain.state_dict()["fc1.weight"], moved.student.state_dict()["fc1.weight"]
    )
    seen: list[int] = []

    def spy(xb: torch.Tensor) -> torch.Tensor:
        seen.append(int(xb.shape[0]))
        return teacher(xb)

    distill(task.build_student(0), spy, x, DistillConfig(epochs=1, batch_size=32, shift=1))
    assert seen == [96, 96]  # the batch, its mixes, its translated copy
    # Flat inputs (an MLP's features) cannot be translated: the setting adds nothing there.
    mlp = get_task("digits-mlp")
    assert mlp.build_student is not None
    flat = x.flatten(1)
    a = distill(mlp.build_student(0), logits_of(mlp.build_model(1)), flat, base).student
    b = distill(
        mlp.build_student(0), logits_of(mlp.build_model(1)), flat, replace(base, shift=2)
    ).student
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_distill_trains_a_copy_towards_the_teacher_and_keeps_masked_weights_zero() -> None:
    task = get_task("digits-cnn")
    assert task.build_student is not None
    x = task.load_data().x_train[:64]
    teacher = task.build_model(1)
    student = task.build_student(0)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    masks = {"fc1.weight": torch.rand(student.state_dict()["fc1.weight"].shape) > 0.5}
    gap0 = _gap(student, teacher, x)
    out = distill(student, logits_of(teacher), x, DistillConfig(epochs=5, mixup=False), masks=masks)
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k])  # the argument is not modified
    trained = out.student
    assert not bool(trained.state_dict()["fc1.weight"][~masks["fc1.weight"]].any())
    gap1 = _gap(trained, teacher, x)
    assert gap1 < gap0


def test_ensemble_is_the_weighted_average_of_logits() -> None:
    a, b = DigitsCNN(), DigitsCNN()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        want = (1 * a(x) + 3 * b(x)) / 4
    assert torch.allclose(ensemble([a, b], [1, 3])(x), want, atol=1e-6)


def test_fusion_leaves_the_model_unchanged_when_every_client_model_equals_it() -> None:
    task = get_task("digits-cnn")
    x = task.load_data().x_train[:48]
    model = task.build_model(0)
    clients = [task.build_model(0) for _ in range(3)]
    fused = fuse(clients, x, QUICK, weights=[10, 20, 30]).student
    for name, value in model.state_dict().items():
        assert torch.equal(fused.state_dict()[name], value), name


def test_fusion_starts_from_the_average_and_moves_towards_the_ensemble() -> None:
    x = get_task("digits-cnn").load_data().x_train[:48]
    torch.manual_seed(0)  # two fixed random clients (unseeded, a few inits sit too close)
    a, b = DigitsCNN(), DigitsCNN()
    fused0 = fuse([a, b], x, DistillConfig(epochs=0)).student
    for name, value in fused0.state_dict().items():
        assert torch.allclose(value, (a.state_dict()[name] + b.state_dict()[name]) / 2)
    teacher = ensemble([a, b])
    fused = fuse([a, b], x, DistillConfig(epochs=5)).student
    with torch.no_grad():
        target = teacher(x)
    gap0, gap1 = _gap(fused0, None, x, target), _gap(fused, None, x, target)
    assert gap1 < gap0


def test_students_are_a_quarter_of_their_teachers_or_less() -> None:
    for name in ("digits-cnn", "digits-mlp"):
        task = get_task(name)
        assert task.build_student is not None
        teacher, student = task.build_model(0), task.build_student(0)
        assert 4 * _count(student) <= _count(teacher)
        x = torch.rand(3, 1, 8, 8)
        with torch.no_grad():
            assert student(x).shape == teacher(x).shape == (3, 10)
        assert isinstance(student, nn.Module)
        assert torch.equal(
            task.build_student(0).state_dict()["fc1.weight"], student.state_dict()["fc1.weight"]
        )


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
