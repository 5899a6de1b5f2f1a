"""Local training and evaluation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from fedsqueeze.tasks import (
    DigitsCNN,
    Optimizer,
    TaskData,
    build_digits_cnn,
    build_digits_mlp,
    evaluate,
    load_digits_data,
    train,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def data() -> TaskData:
    return load_digits_data()


def _small(data: TaskData, n: int = 256) -> tuple[Tensor, Tensor]:
    return data.x_train[:n], data.y_train[:n]


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _magnitude_masks(model: nn.Module, keep: float) -> dict[str, Tensor]:
    masks = {}
    for name, param in model.named_parameters():
        if name.endswith("weight"):
            threshold = param.detach().abs().flatten().quantile(1 - keep)
            masks[name] = param.detach().abs() > threshold
    return masks


def test_cnn_reaches_90_percent_test_accuracy(data: TaskData) -> None:
    model = build_digits_cnn(0)
    result = train(model, data.x_train, data.y_train, epochs=3, lr=0.05, seed=0)
    assert result.num_examples == 1437
    assert result.seconds > 0
    assert 0 < result.loss < 0.5
    score = evaluate(model, data.x_test, data.y_test)
    assert score.num_examples == 360
    assert score.accuracy > 0.9


def test_mlp_learns_with_adam(data: TaskData) -> None:
    model = build_digits_mlp(0)
    before = evaluate(model, data.x_test, data.y_test)
    train(model, data.x_train, data.y_train, epochs=2, lr=3e-3, seed=0, optimizer=Optimizer.ADAM)
    after = evaluate(model, data.x_test, data.y_test)
    assert after.accuracy > 0.85 > before.accuracy
    assert after.loss < before.loss


@pytest.mark.parametrize("optimizer", list(Optimizer))
def test_training_is_deterministic_for_a_seed(data: TaskData, optimizer: Optimizer) -> None:
    x, y = _small(data)
    runs = []
    for seed in (1, 1, 2):
        model = build_digits_cnn(0)
        loss = train(model, x, y, epochs=1, lr=0.01, seed=seed, optimizer=optimizer).loss
        runs.append((loss, _state(model)))
    assert runs[0][0] == runs[1][0]
    assert _same(runs[0][1], runs[1][1])
    assert not _same(runs[0][1], runs[2][1])


def test_training_touches_neither_inputs_nor_global_rng(data: TaskData) -> None:
    x, y = _small(data, 64)
    x_copy, y_copy = x.clone(), y.clone()
    model = build_digits_mlp(0)
    masks = _magnitude_masks(model, 0.5)
    masks_copy = {k: v.clone() for k, v in masks.items()}
    torch.manual_seed(99)
    rng = torch.get_rng_state()
    train(model, x, y, epochs=1, lr=0.01, seed=0, masks=masks, proximal_mu=0.1, l1_lambda=1e-4)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(x, x_copy)
    assert torch.equal(y, y_copy)
    assert _same(masks, masks_copy)


@pytest.mark.parametrize("optimizer", list(Optimizer))
def test_masked_weights_stay_exactly_zero(data: TaskData, optimizer: Optimizer) -> None:
    x, y = _small(data)
    model = build_digits_cnn(0)
    masks = _magnitude_masks(model, keep=0.3)
    before = _state(model)
    train(model, x, y, epochs=2, lr=0.01, seed=0, masks=masks, optimizer=optimizer, l1_lambda=1e-4)
    after = dict(model.named_parameters())
    for name, keep in masks.items():
        assert torch.all(after[name].detach()[~keep] == 0), name
        assert not torch.equal(after[name].detach()[keep], before[name][keep]), name
    # Parameters without a mask (the biases) still train.
    assert not torch.equal(after["fc1.bias"].detach(), before["fc1.bias"])


def test_l1_penalty_changes_the_result_and_shrinks_weights(data: TaskData) -> None:
    x, y = _small(data)
    plain, sparse = build_digits_mlp(0), build_digits_mlp(0)
    train(plain, x, y, epochs=2, lr=0.01, seed=0)
    train(sparse, x, y, epochs=2, lr=0.01, seed=0, l1_lambda=1e-3)
    assert not _same(_state(plain), _state(sparse))

    def l1(model: nn.Module) -> float:
        return sum(float(v.abs().sum()) for n, v in model.state_dict().items() if "weight" in n)

    assert l1(sparse) < l1(plain)


def test_proximal_term_keeps_weights_near_the_start(data: TaskData) -> None:
    x, y = _small(data)
    start = _state(build_digits_mlp(0))

    def drift(mu: float) -> float:
        model = build_digits_mlp(0)
        train(model, x, y, epochs=2, lr=0.05, seed=0, proximal_mu=mu)
        return sum(float((p - start[n]).pow(2).sum()) for n, p in _state(model).items())

    assert drift(10.0) < drift(0.0)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_train_and_evaluate_restore_the_model_mode(data: TaskData, mode: str) -> None:
    x, y = _small(data, 32)
    model = build_digits_cnn(0)
    model.train(mode == "train")
    evaluate(model, x, y)
    assert model.training is (mode == "train")
    train(model, x, y, epochs=1, lr=0.01, seed=0)
    assert model.training is (mode == "train")


def test_mixed_submodule_modes_are_restored(data: TaskData) -> None:
    x, y = _small(data, 32)
    model = build_digits_cnn(0)
    assert isinstance(model, DigitsCNN)
    model.fc1.eval()
    evaluate(model, x, y)
    train(model, x, y, epochs=1, lr=0.01, seed=0)
    assert model.training and model.conv1.training and not model.fc1.training


def test_evaluate_does_not_change_the_model(data: TaskData) -> None:
    model = build_digits_cnn(0)
    before = _state(model)
    score = evaluate(model, data.x_test, data.y_test, batch_size=7)
    assert _same(before, _state(model))
    assert 0.0 <= score.accuracy <= 1.0
    whole = evaluate(model, data.x_test, data.y_test, batch_size=1000)
    assert score.accuracy == whole.accuracy
    assert score.loss == pytest.approx(whole.loss, rel=1e-5)


def test_train_handles_a_single_example(data: TaskData) -> None:
    x, y = _small(data, 1)
    result = train(build_digits_cnn(0), x, y, epochs=2, lr=0.01, seed=0)
    assert result.num_examples == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"lr": 0.0},
        {"lr": float("nan")},
        {"batch_size": 0},
        {"l1_lambda": -1.0},
        {"proximal_mu": -0.1},
    ],
)
def test_bad_training_arguments_are_value_errors(data: TaskData, kwargs: dict[str, float]) -> None:
    x, y = _small(data, 8)
    args: dict[str, float] = {"epochs": 1, "lr": 0.01, **kwargs}
    with pytest.raises(ValueError):
        train(build_digits_mlp(0), x, y, seed=0, **args)  # type: ignore[arg-type]


def test_mismatched_or_empty_data_is_a_value_error(data: TaskData) -> None:
    x, y = _small(data, 8)
    model = build_digits_mlp(0)
    with pytest.raises(ValueError):
        train(model, x, y[:4], epochs=1, lr=0.01, seed=0)
    with pytest.raises(ValueError):
        evaluate(model, x[:0], y[:0])
    with pytest.raises(ValueError):
        evaluate(model, x, y.float())


def test_bad_masks_are_rejected(data: TaskData) -> None:
    x, y = _small(data, 8)
    model = build_digits_mlp(0)
    with pytest.raises(ValueError, match="unknown parameter"):
        train(
            model, x, y, epochs=1, lr=0.01, seed=0, masks={"nope": torch.ones(1, dtype=torch.bool)}
        )
    with pytest.raises(ValueError, match="shape"):
        train(model, x, y, epochs=1, lr=0.01, seed=0, masks={"fc3.bias": torch.ones(3).bool()})
    with pytest.raises(TypeError):
        train(model, x, y, epochs=1, lr=0.01, seed=0, masks={"fc3.bias": torch.ones(10)})


def test_optimizer_must_be_the_enum(data: TaskData) -> None:
    x, y = _small(data, 8)
    with pytest.raises(TypeError):
        train(build_digits_mlp(0), x, y, epochs=1, lr=0.01, seed=0, optimizer="sgd")  # type: ignore[arg-type]


def test_optimizer_values_are_config_spellings() -> None:
    assert Optimizer("sgd") is Optimizer.SGD
    assert Optimizer("adam") is Optimizer.ADAM


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_gpu_returns_the_model_to_its_device(data: TaskData) -> None:
    x, y = _small(data)
    model = build_digits_cnn(0)
    masks = _magnitude_masks(model, 0.5)
    train(model, x, y, epochs=1, lr=0.01, seed=0, masks=masks, device=torch.device("cuda"))
    assert all(p.device.type == "cpu" for p in model.parameters())
    for name, keep in masks.items():
        assert torch.all(dict(model.named_parameters())[name].detach()[~keep] == 0)
    assert evaluate(model, x, y).num_examples == x.shape[0]
