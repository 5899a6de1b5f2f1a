"""The ``text`` sweep config: it loads, validates and keeps to the issue's limits, and the
pieces it relies on (arms with their own task, ``first-delivery``) check their input."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from coordinator.budget import Choice, EdgeRequest, Skip
from fedsqueeze.errors import ConfigError
from fedsqueeze.tasks.base import Optimizer
from fedsqueeze.tasks.text_task import parse_text_task
from simulations.baselines import ARM_PRESETS, ArmConfig, ArmKind
from simulations.config import load_config
from simulations.first_delivery import FirstDeliveryPolicy

TEXT = Path(__file__).resolve().parents[2] / "simulations" / "configs" / "text.toml"


def test_the_text_config_loads_with_its_arms() -> None:
    config = load_config(TEXT)
    assert config.name == "text"
    # the four arms run by default
    assert [a.name for a in config.arms] == [
        "fedavg-full",
        "fedavg-adapters",
        "adaptive-ffa",
        "adaptive-ffa-nf4",
    ]
    assert config.baseline == "fedavg-adapters"
    full, adapters, ffa, ffa_nf4 = config.arms
    assert full.kind is ArmKind.FLOWER and adapters.kind is ArmKind.FLOWER
    assert ffa.kind is ArmKind.FEDSQUEEZE and ffa_nf4.kind is ArmKind.FEDSQUEEZE
    # Full fine-tuning: every layer trained, nothing left out of Flower's messages.
    full_task = parse_text_task(config.arm_task(full))
    assert full_task is not None and full_task.unfreeze_top == 6
    assert config.run_settings(full, "").freeze == "none"
    # ... with Adam at a small rate, as transformers are fine-tuned (the others: SGD)
    assert config.run_settings(full, "").optimizer is Optimizer.ADAM
    assert config.run_settings(full, "").lr < config.lr
    assert {config.run_settings(a, "").optimizer for a in config.arms[1:]} == {Optimizer.SGD}
    # FFA (B alone trains) is stable at a larger step, where plain LoRA adapters collapse.
    assert config.run_settings(ffa, "").lr == 0.05 > config.lr
    assert config.run_settings(adapters, "").lr == config.lr
    # FFA-LoRA: the seeded A is frozen like the backbone, only B and the head travel.
    for arm in (ffa, ffa_nf4):
        ffa_task = parse_text_task(config.arm_task(arm))
        assert ffa_task is not None and ffa_task.freeze_lora_a == 1
        assert config.arm_frozen(arm) == ("frozen.*", "seeded.*")
        assert not any("rank=" in spec for spec in arm.up_ladder)
    # The NF4 arm is adaptive-ffa with the backbone sent once, nothing else changed.
    assert ffa_nf4 == replace(
        ffa,
        name="adaptive-ffa-nf4",
        first_delivery=ffa_nf4.first_delivery,
        description=ffa_nf4.description,
    )
    assert ffa_nf4.first_delivery.startswith("quant=4:nf4")
    assert config.run_settings(ffa, "").init_from_seed
    assert not config.run_settings(ffa_nf4, "").init_from_seed
    assert ffa.down_budget > 0 and ffa.up_budget > 0
    # The adapters baseline freezes the task's backbone.
    assert config.run_settings(adapters, "").frozen(("frozen.*",)) == ("frozen.*",)
    assert config.arm_task(adapters) == config.task


def test_the_extra_text_arms_run_when_named() -> None:
    config = load_config(TEXT, ["arms=adaptive,adaptive-nf4,adaptive-head,fedavg-ffa"])
    adaptive, nf4, head, fedavg_ffa = config.arms
    ffa = load_config(TEXT).arm("adaptive-ffa")
    for arm in (adaptive, nf4):
        assert config.arm_task(arm) == config.task and arm.down_budget == 6000
        assert config.run_settings(arm, "").lr == config.lr
    assert config.run_settings(adaptive, "").init_from_seed
    assert nf4.first_delivery.startswith("quant=4:nf4")
    head_task = parse_text_task(config.arm_task(head))
    assert head_task is not None and head_task.lora_rank == 0
    assert head.down_ladder == ffa.down_ladder and head.up_ladder == ffa.up_ladder
    assert fedavg_ffa.kind is ArmKind.FLOWER
    assert config.arm_frozen(fedavg_ffa) == ("frozen.*", "seeded.*")


def test_a_subset_of_the_arms_runs_without_the_others_tables() -> None:
    config = load_config(TEXT, ["arms=fedavg-adapters,adaptive-ffa"])
    assert [a.name for a in config.arms] == ["fedavg-adapters", "adaptive-ffa"]
    assert (
        config.arm("adaptive-ffa").down_budget == load_config(TEXT).arm("adaptive-ffa").down_budget
    )
    # a --set for an arm left out is still a mistake
    with pytest.raises(ConfigError, match="not in arms"):
        load_config(TEXT, ["arms=fedavg-adapters", "arm.adaptive-ffa.down-budget=1"])


def test_the_text_config_fits_two_cores() -> None:
    config = load_config(TEXT)
    options = parse_text_task(config.task)
    assert options is not None and options.max_length <= 64
    assert config.num_clients == 20 and config.clients_per_round == 10
    assert config.prefix_points == 0


def test_the_plain_flower_preset_sends_every_tensor() -> None:
    assert ARM_PRESETS["fedavg-fp32"].freeze == "none"


def test_a_bad_arm_task_or_first_delivery_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown task"):
        load_config(TEXT, ["arm.fedavg-full.task=no-such-task"])
    with pytest.raises(ConfigError, match="lora-rank"):
        load_config(TEXT, ["arm.fedavg-full.task=minilm-text@lora-rank=-1"])
    with pytest.raises(ConfigError):
        load_config(TEXT, ["arm.adaptive-ffa-nf4.first-delivery=quant=99"])
    with pytest.raises(ConfigError, match="first-delivery needs a fedsqueeze arm"):
        ArmConfig("x", kind=ArmKind.FLOWER, first_delivery="int8")
    with pytest.raises(ConfigError, match="lr must be"):
        load_config(TEXT, ["arm.adaptive-ffa.lr=-0.1"])
    with pytest.raises(ConfigError, match="prefix-points"):
        load_config(TEXT, ["prefix-points=-1"])


class _Inner:
    def __init__(self, answer: Choice | Skip) -> None:
        self.answer = answer
        self.requests: list[EdgeRequest] = []
        self.observed: list[tuple[int, int, float | None]] = []

    def choose(self, request: EdgeRequest) -> Choice | Skip:
        self.requests.append(request)
        return self.answer

    def observe(self, bytes_down: int, bytes_up: int, *, compute_s: float | None = None) -> None:
        self.observed.append((bytes_down, bytes_up, compute_s))


def test_first_delivery_goes_to_an_edge_that_holds_nothing() -> None:
    inner = _Inner(Choice("quant=4", "rank=1,quant=4", 900, 1000, 2000))
    policy = FirstDeliveryPolicy(inner, "quant=4:nf4:block64", "init")
    first = policy.choose(EdgeRequest(1, 7, "target", None))
    assert first == Choice("quant=4:nf4:block64", "rank=1,quant=4", 0, 0, 2000)
    # The upload is sized as for an edge holding the initial model.
    assert inner.requests[-1].held == "init"
    later = policy.choose(EdgeRequest(2, 7, "next", "target"))
    assert later == inner.answer and inner.requests[-1].held == "target"
    policy.observe(10, 20, compute_s=1.5)
    assert inner.observed == [(10, 20, 1.5)]


def test_first_delivery_keeps_a_skip() -> None:
    inner = _Inner(Skip("too small"))
    policy = FirstDeliveryPolicy(inner, "int8", "init")
    assert policy.choose(EdgeRequest(1, 7, "target", None)) == Skip("too small")


def test_delivery_costs_lossless_keeps_the_accuracy_and_smaller_specs_cost_fewer_bytes() -> None:
    from fedsqueeze.tasks import get_task
    from simulations.backbone_delivery import delivery_costs

    task = get_task("digits-cnn")
    final = task.build_model(0).state_dict()
    frozen = (next(iter(final)).split(".")[0] + ".*",)
    data = task.load_data()
    exact = task.evaluate(task.build_model(0), data.x_test, data.y_test).accuracy
    costs = delivery_costs("digits-cnn", 0, final, frozen)
    assert costs[0].spec == "lossless"
    assert costs[0].accuracy == exact
    assert costs[0].nbytes > costs[1].nbytes > costs[2].nbytes
