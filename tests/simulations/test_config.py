"""Experiment configs: defaults < TOML < --set, validation before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.budget import PolicyKind
from fedsqueeze.errors import ConfigError
from fedsqueeze.runconfig import Partitioning, RunSettings, StrategyName
from fedsqueeze.tasks.base import Optimizer
from simulations import baselines
from simulations.baselines import (
    ARM_PRESETS,
    DEFAULT_ARMS,
    DISTILLED_STUDENT_LR,
    STUDENT_DOWN_BUDGET,
    STUDENT_UP_BUDGET,
    ArmKind,
)
from simulations.config import SimulationConfig, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "simulations" / "configs"


def test_defaults_are_the_default_sweep() -> None:
    c = load_config(None)
    assert [a.name for a in c.arms] == list(DEFAULT_ARMS)
    assert c.arm("fedavg-fp32").kind is ArmKind.FLOWER
    assert c.arm("adaptive").policy is PolicyKind.ADAPTIVE and c.arm("adaptive").budgeted
    assert not c.arm("int8").budgeted
    assert c.partitioning is Partitioning.DIRICHLET and c.num_clients == 20


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_configs_load(path: Path) -> None:
    config = load_config(path)
    assert config.name == path.stem


def test_set_overrides_the_file(tmp_path: Path) -> None:
    f = tmp_path / "x.toml"
    f.write_text(
        'name = "x"\nnum-rounds = 4\narms = ["fedavg-fp32", "adaptive"]\n'
        "[arm.adaptive]\ndown-budget = 5000\n"
    )
    c = load_config(
        f,
        [
            "num-rounds=2",
            "links=4g:1,2g:1",
            "partitioning=IID",
            "arm.adaptive.up-budget=700",
            "arm.adaptive.up-ladder=topk=0.1,quant=4;topk=0.01,quant=2",
        ],
    )
    assert c.num_rounds == 2 and c.partitioning is Partitioning.IID
    assert c.link_mix().shares == (("4g", 1.0), ("2g", 1.0))
    adaptive = c.arm("adaptive")
    assert (adaptive.down_budget, adaptive.up_budget) == (5000, 700)
    assert adaptive.up_ladder == ("topk=0.1,quant=4", "topk=0.01,quant=2")
    assert load_config(f, ["arms=adaptive"]).arms == (load_config(f).arm("adaptive"),)


def test_a_subset_of_a_configs_arms_skips_the_others_tables(tmp_path: Path) -> None:
    f = tmp_path / "x.toml"
    f.write_text(
        'name = "x"\narms = ["sparse", "adaptive"]\n'
        '[arm.adaptive]\ndown-budget = 5000\n[arm.sparse]\ndown-spec = "int4"\n'
    )
    # spaces around a --set key are the same key
    for item in ("arms=adaptive", " arms = adaptive"):
        assert [a.name for a in load_config(f, [item]).arms] == ["adaptive"]
    # an arm table a --set names, for an arm left out, is a mistake
    for item in ("arm.sparse.down-spec=int8", " arm.sparse.down-spec = int8"):
        with pytest.raises(ConfigError, match=r"\[arm\.sparse\] is not in arms"):
            load_config(f, ["arms=adaptive", item])


def test_new_arms_can_be_defined(tmp_path: Path) -> None:
    c = load_config(None, ["arms=fedavg-fp32,sparse", "arm.sparse.down-spec=int4"])
    assert c.arm("sparse").down_spec == "int4" and c.arm("sparse").kind is ArmKind.FEDSQUEEZE


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["num-round=3"], "unknown key 'num-round'"),
        (["clients-per-round=30"], "clients-per-round"),
        (["num-rounds=2.5"], "expected int"),
        (["client-cpus=64"], "no client could ever run"),
        (["arm.adaptive.down-spec=prune=l1:2"], "codec spec"),
        (["arm.nosuch.down-budget=1"], "not in arms"),
        (["arms=int8,int8"], "unique"),
        (["arms=nosuch"], "unknown arm 'nosuch'; known arms: fedavg-fp32, fp16"),
        (["arms=fedavg-fp32,int9"], r"unknown arm 'int9'.*\[arm\.int9\]"),
        (["links=5g"], "unknown link profile"),
        (["set-without-equals"], "key=value"),
        (["arm.adaptive.total-budget=10", "arm.adaptive.budget-fraction=0.1"], "not both"),
        (["arms=distill", "arm.distill.student-lr=-0.1"], "student-lr must be >= 0"),
        (["arms=adaptive", "arm.adaptive.student-lr=0.01"], "need student-links"),
        (["arms=adaptive", "arm.adaptive.student-from-teacher=false"], "need student-links"),
        (["arms=adaptive", "arm.adaptive.student-down-budget=600"], "need student-links"),
        (["arms=distill", "arm.distill.student-up-budget=-1"], "student-up-budget must be >= 0"),
        (["arms=distill", "arm.distill.student-down-budget=0.5"], "expected int"),
        (["arms=distill", "arm.distill.student-from-teacher=0"], "expected true or false"),
        (["arms=adaptive", "arm.adaptive.fusion-warmup=3"], "fusion-warmup needs aggregation"),
        (["arms=adaptive-feddf", "arm.adaptive-feddf.fusion-warmup=-1"], "must be >= 0"),
        (["arms=adaptive-feddf", "arm.adaptive-feddf.distill-epochs=-1"], "must be >= 0"),
        (["arms=adaptive", "arm.adaptive.server-momentum=0.5"], "need strategy = fedavgm"),
        (["arms=adaptive", "arm.adaptive.strategy=fedavgm", "arm.adaptive.server-lr=0"], "> 0"),
        (["arms=fedavg-fp32", "arm.fedavg-fp32.strategy=fedavgm"], "needs a fedsqueeze arm"),
        (["arms=adaptive", "arm.adaptive.strategy=fedsgd"], "expected one of fedavg"),
        (["arms=fedavg-fp32", "arm.fedavg-fp32.optimizer=lbfgs"], "expected one of sgd, adam"),
        (["arms=adaptive", "arm.adaptive.inline-bytes=-1"], "inline-bytes must be in"),
        (["arms=adaptive", "arm.adaptive.inline-bytes=1000000"], "inline-bytes must be in"),
        (["arms=fedavg-fp32", "arm.fedavg-fp32.inline-bytes=4096"], "needs a fedsqueeze arm"),
    ],
)
def test_mistakes_are_config_errors(sets: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, sets)


def test_bad_toml_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("num-rounds = = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_config(f)


def test_run_settings_let_the_grid_sample() -> None:
    c = SimulationConfig()
    s = c.run_settings(c.arm("int8"), "/tmp/x")
    assert (s.fraction_train, s.min_train_nodes, s.min_available_nodes) == (1.0, 1, 1)
    assert s.init_from_seed and s.down_spec == "int8" and s.up_spec == "int8"


def test_an_arm_sets_the_runs_frozen_parts() -> None:
    config = load_config(None, ["arms=int8", "arm.int8.freeze=none"])
    assert config.run_settings(config.arm("int8"), "s").freeze == "none"
    assert load_config(None, ["arms=int8"]).arms[0].freeze == "auto"
    with pytest.raises(ConfigError, match="freeze") as err:
        load_config(None, ["arms=int8", "arm.int8.freeze=*"])
    assert "\n" not in str(err.value)


def test_distilling_arms_carry_their_options_to_the_run() -> None:
    c = load_config(None, ["arms=fedavg-fp32,distill,student-fedavg,adaptive-feddf"])
    distill = c.run_settings(c.arm("distill"), "s")
    assert distill.student_refresh_every == 1 and distill.student_from_teacher
    assert distill.student_lr == DISTILLED_STUDENT_LR < c.lr
    baseline = c.run_settings(c.arm("student-fedavg"), "s")
    # the baseline: the same student, clients and budgets, no teacher, the sweep's lr
    assert not baseline.student_from_teacher and baseline.student_lr == 0
    assert c.arm("student-fedavg").student_links == c.arm("distill").student_links
    assert baseline.down_spec == distill.down_spec and c.arm("student-fedavg").budgeted
    feddf = c.run_settings(c.arm("adaptive-feddf"), "s")
    assert (feddf.fusion_warmup, feddf.distill_epochs) == (10, 40)
    # every arm's clients hold the same data: the proxy rows are out for all of them
    assert all(c.run_settings(a, "s").held_out_proxy == 360 for a in c.arms)
    s = load_config(None, ["arms=distill", "arm.distill.student-lr=0.02"])
    assert s.run_settings(s.arm("distill"), "s").student_lr == 0.02


def test_student_arms_carry_their_own_budgets() -> None:
    c = load_config(None, ["arms=distill,student-fedavg,adaptive"])
    for name in ("distill", "student-fedavg"):
        arm = c.arm(name)
        # the baseline gets the same student budgets as distill
        assert (arm.student_down_budget, arm.student_up_budget) == (
            STUDENT_DOWN_BUDGET,
            STUDENT_UP_BUDGET,
        )
        assert (arm.down_budget, arm.up_budget) == (3_700, 2_400)  # the teacher's: adaptive's
        run = c.run_settings(arm, "s")
        assert (run.student_down_budget, run.student_up_budget) == (595, 531)
    adaptive = c.run_settings(c.arm("adaptive"), "s")
    assert (adaptive.student_down_budget, adaptive.student_up_budget) == (0, 0)
    # 0: the arm's budgets, as before this option
    off = load_config(
        None,
        ["arms=distill", "arm.distill.student-down-budget=0", "arm.distill.student-up-budget=0"],
    )
    assert off.run_settings(off.arm("distill"), "s").student_down_budget == 0


def test_an_arms_server_optimizer_reaches_its_run() -> None:
    c = load_config(
        None,
        [
            "arms=adaptive",
            "arm.adaptive.strategy=fedavgm",
            "arm.adaptive.server-momentum=0.5",
            "arm.adaptive.server-lr=0.8",
        ],
    )
    s = c.run_settings(c.arm("adaptive"), "s")
    assert (s.strategy, s.server_lr, s.server_momentum) == (StrategyName.FEDAVGM, 0.8, 0.5)
    plain = SimulationConfig().run_settings(SimulationConfig().arm("adaptive"), "s")
    assert plain.strategy is StrategyName.FEDAVG and plain.server_momentum == 0.0


def test_an_arms_local_optimizer_reaches_its_run_for_either_kind() -> None:
    c = load_config(
        None,
        ["arms=fedavg-fp32,adaptive", "arm.fedavg-fp32.optimizer=Adam", "arm.fedavg-fp32.lr=1e-3"],
    )
    flower = c.run_settings(c.arm("fedavg-fp32"), "s")
    assert (flower.optimizer, flower.lr) == (Optimizer.ADAM, 1e-3)
    # the other arm keeps the default, and the run settings carry it to the edges
    assert c.run_settings(c.arm("adaptive"), "s").optimizer is Optimizer.SGD
    assert RunSettings.from_run_config(flower.to_run_config()).optimizer is Optimizer.ADAM


def test_every_preset_arm_is_in_the_documented_table() -> None:
    doc = baselines.__doc__ or ""
    for name in ARM_PRESETS:
        assert f"``{name}``" in doc, name


def test_the_frontier_arm_sends_its_payloads_inline() -> None:
    config = load_config(None, ["arms=frontier"])
    frontier = config.arm("frontier")
    assert frontier.inline_bytes == baselines.FRONTIER_INLINE_BYTES
    assert config.run_settings(frontier, "x").inline_bytes == frontier.inline_bytes
    assert config.run_settings(config.arm("frontier"), "x").server_momentum == 0.5
    assert ARM_PRESETS["adaptive"].inline_bytes == 0  # the other arms keep the data plane


def test_an_arm_can_start_from_another_and_extra_arms_run_when_named(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        'arms = ["a", "b"]\nextra-arms = ["c"]\n'
        '[arm.a]\npolicy = "adaptive"\ndown-budget = 5000\nlr = 0.05\n'
        '[arm.b]\nbase = "a"\nfirst-delivery = "quant=4:nf4:block64"\n'
        '[arm.c]\nbase = "b"\nlr = 0.01\n'
    )
    c = load_config(f)
    assert [a.name for a in c.arms] == ["a", "b"]
    b = c.arm("b")
    # b is a with its own keys on top; a itself is unchanged
    assert (b.policy, b.down_budget, b.lr, b.first_delivery) == (
        PolicyKind.ADAPTIVE,
        5000,
        0.05,
        "quant=4:nf4:block64",
    )
    assert c.arm("a").first_delivery == ""
    # an extra arm is defined by the file but runs only when named
    only_c = load_config(f, ["arms=c"])
    (arm_c,) = only_c.arms
    assert (arm_c.name, arm_c.lr, arm_c.first_delivery, arm_c.down_budget) == (
        "c",
        0.01,
        "quant=4:nf4:block64",
        5000,
    )
    # a preset can be a base too
    p = load_config(None, ["arms=mine", "arm.mine.base=adaptive", "arm.mine.up-budget=99"])
    assert p.arm("mine").policy is PolicyKind.ADAPTIVE and p.arm("mine").up_budget == 99


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('arms = ["a"]\n[arm.a]\nbase = "nosuch"\n', r"arm\.a\.base = 'nosuch': not an arm"),
        ('arms = ["a"]\n[arm.a]\nbase = "b"\n[arm.b]\nbase = "a"\n', "cycle: a -> b -> a"),
        ('arms = ["a"]\n[arm.a]\nlr = 0.1\n[arm.z]\nlr = 0.2\n', r"\[arm\.z\] is not in arms"),
        ('arms = ["a"]\nextra-arms = ["nosuch"]\n[arm.a]\nlr = 0.1\n', "unknown arm 'nosuch'"),
        ('arms = ["a"]\nextra-arms = 3\n[arm.a]\nlr = 0.1\n', "extra-arms must be a list"),
    ],
)
def test_base_and_extra_arm_mistakes_are_config_errors(
    tmp_path: Path, text: str, message: str
) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(f)
