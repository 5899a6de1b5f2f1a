"""Built-in models: sizes, state_dict keys and seeded initialisation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fedsqueeze.tasks import DigitsCNN, build_digits_cnn, build_digits_mlp, load_digits_data


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_cnn_has_exactly_38282_parameters_and_named_keys() -> None:
    model = build_digits_cnn(0)
    assert _num_params(model) == 38_282
    assert list(model.state_dict()) == [
        "conv1.weight",
        "conv1.bias",
        "conv2.weight",
        "conv2.bias",
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
    ]


def test_mlp_is_lenet_300_100() -> None:
    model = build_digits_mlp(0)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "fc1.weight": (300, 64),
        "fc1.bias": (300,),
        "fc2.weight": (100, 300),
        "fc2.bias": (100,),
        "fc3.weight": (10, 100),
        "fc3.bias": (10,),
    }


@pytest.mark.parametrize("build", [build_digits_cnn, build_digits_mlp])
def test_models_map_digit_batches_to_ten_logits(build: Callable[[int], torch.nn.Module]) -> None:
    x = load_digits_data().x_test[:5]
    assert build(0)(x).shape == (5, 10)


@pytest.mark.parametrize("build", [build_digits_cnn, build_digits_mlp])
def test_same_seed_gives_bit_identical_weights(build: Callable[[int], torch.nn.Module]) -> None:
    a, b, c = build(7).state_dict(), build(7).state_dict(), build(8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_building_leaves_the_global_rng_untouched() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    build_digits_cnn(5)
    assert torch.equal(torch.get_rng_state(), before)


def test_seed_does_not_depend_on_global_rng_state() -> None:
    torch.manual_seed(1)
    a = build_digits_cnn(3).state_dict()
    torch.manual_seed(2)
    b = build_digits_cnn(3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_int_seed_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        build_digits_cnn(1.5)  # type: ignore[arg-type]


def test_cnn_num_classes_changes_only_the_head() -> None:
    assert DigitsCNN(num_classes=3).fc2.out_features == 3
