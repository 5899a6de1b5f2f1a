"""The Deep Compression recipe on a tiny schedule (a few seconds on one thread)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedsqueeze.codec import (
    EncodedModel,
    FloatFormat,
    PruneMethod,
    QuantScheme,
    decode_state,
    encode_state,
)
from fedsqueeze.codec.kmeans import kmeans_codebook
from fedsqueeze.codec.pruning import count_to_prune
from fedsqueeze.recipes import (
    CompressionResult,
    DeepCompressionConfig,
    Stage,
    compress_task,
    recipe_spec,
)
from fedsqueeze.tasks import get_task

Run = tuple[CompressionResult, list[tuple[Stage, int, int]]]

TINY = DeepCompressionConfig(
    dense_epochs=5, schedule=(0.7, 0.9), finetune_epochs=2, centroid_epochs=2, bits=3
)
TARGETS = ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight")


@pytest.fixture(scope="module")
def run() -> Run:
    calls: list[tuple[Stage, int, int]] = []
    result = compress_task(
        get_task("digits-cnn"), TINY, seed=0, progress=lambda s, d, t: calls.append((s, d, t))
    )
    return result, calls


def test_decoded_model_is_sparse_shared_and_small(run: Run) -> None:
    result, _ = run
    decoded = decode_state(EncodedModel.from_bytes(result.encoded.to_bytes()))
    total = sum(decoded[name].numel() for name in TARGETS)
    zeros = sum(int((decoded[name] == 0).sum()) for name in TARGETS)
    assert zeros == count_to_prune(total, 0.9)
    for name in TARGETS:
        kept = decoded[name][decoded[name] != 0]
        assert torch.unique(kept).numel() <= 2**TINY.bits
    for name in ("conv1.bias", "fc2.bias"):  # biases travel as fp16
        assert torch.equal(decoded[name], decoded[name].half().float())
    assert result.decoded_matches  # the codec stored the shared values exactly
    for name, t in result.compressed_state.items():
        assert torch.equal(decoded[name], t)
    assert result.ratio > 20
    assert result.encoded_bytes == len(result.encoded.to_bytes())
    assert result.fp32_bytes == 4 * 38_282


def test_accuracy_is_far_above_chance(run: Run) -> None:
    result, _ = run
    assert result.dense_accuracy > 0.8
    assert result.final_accuracy > 0.8  # chance is 0.1
    assert result.accuracy_loss == pytest.approx(result.dense_accuracy - result.final_accuracy)


def test_history_and_progress(run: Run) -> None:
    result, calls = run
    assert [h.stage for h in result.history] == [
        Stage.DENSE, Stage.PRUNE, Stage.PRUNE, Stage.SHARE, Stage.ENCODE,
    ]  # fmt: skip
    assert [h.sparsity for h in result.history[1:3]] == pytest.approx([0.7, 0.9], abs=1e-3)
    assert [d for _, d, _ in calls] == list(range(1, TINY.total_units + 1))
    assert {t for _, _, t in calls} == {TINY.total_units}
    assert calls[-1][0] is Stage.ENCODE
    assert result.num_threads == 1


def test_thread_count_is_restored() -> None:
    before = torch.get_num_threads()
    compress_task(
        get_task("digits-cnn"),
        dataclasses.replace(TINY, dense_epochs=1, finetune_epochs=0, centroid_epochs=0),
        seed=1,
    )
    assert torch.get_num_threads() == before


def test_recipe_spec() -> None:
    spec = recipe_spec(TINY)
    assert spec.prune.method is PruneMethod.L1_GLOBAL
    assert spec.prune.sparsity == 0.9
    assert spec.quant is not None and spec.quant.scheme is QuantScheme.KMEANS
    assert spec.quant.bits == 3
    assert spec.float_format is FloatFormat.FP16


@pytest.mark.parametrize(
    "change",
    [
        {"schedule": ()},
        {"schedule": (0.9, 0.5)},
        {"schedule": (0.5, 1.0)},
        {"bits": 5},
        {"dense_epochs": -1},
        {"lr": 0.0},
        {"num_threads": 0},
        {"entropy_level": 0},
    ],
)
def test_config_rejects_bad_values(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(TINY, **change)  # type: ignore[arg-type]


def test_config_rejects_string_format() -> None:
    with pytest.raises(TypeError):
        dataclasses.replace(TINY, bias_format="fp16")  # type: ignore[arg-type]


def test_codec_reproduces_shared_values_exactly() -> None:
    # Shared weights of a pruned layer: few distinct fp16 values, none near zero.
    values = torch.tensor([-0.93, -0.52, -0.33, -0.17, 0.25, 0.74, 1.03, 1.30]).half().float()
    counts = torch.tensor([3, 10, 16, 26, 36, 8, 5, 2])
    kept = torch.repeat_interleave(values, counts)
    assert torch.equal(torch.unique(kmeans_codebook(kept, 3)), values)
    weight = torch.zeros(10 * kept.numel())  # 90% zeros, as TINY's last step
    weight[::10] = kept
    state = {"w.weight": weight.view(10, -1)}
    decoded = decode_state(encode_state(state, recipe_spec(TINY)))
    assert torch.equal(decoded["w.weight"], state["w.weight"])
