"""The teacher learns from the students: the target and one step by hand, the no-change
cases, the strategy's wiring (off: as before), and bad values."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg
from torch import nn

from coordinator.averaging import average_states
from coordinator.distill import DistillConfig, distill, shifted
from coordinator.strategy import CompressedStrategy, PulledUpdate
from coordinator.student_track import StudentAssignment, StudentTrack, TeacherLearning
from coordinator.version_store import VersionStore
from fedsqueeze.codec import CodecSpec, encode_state
from fedsqueeze.control import CONTROL_KEY, RoundInstruction, TrainReceipt
from fedsqueeze.errors import ConfigError
from fedsqueeze.runconfig import RunSettings, StudentToTeacher
from fedsqueeze.tasks import Optimizer, get_task
from simulations.config import load_config
from tests.coordinator.test_strategy import FakeGrid
from tests.coordinator.test_student_track import _instruction, _noisy, _reply, _teacher

State = dict[str, torch.Tensor]
TASK = get_task("digits-cnn")


def _softmax(row: list[float], temp: float) -> list[float]:
    e = [math.exp(v / temp) for v in row]
    return [v / sum(e) for v in e]


def test_the_update_target_and_one_step_match_a_hand_computation() -> None:
    t = [[2.0, 0.0, 1.0], [0.5, 0.5, 0.5], [1.0, -1.0, 0.0]]
    s1 = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [0.0, 0.0, 0.0]]
    s0 = [[0.5, 1.0, 0.5], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    gain = 0.3
    t_fn, s1_fn, s0_fn = (lambda _x, v=v: torch.tensor(v) for v in (t, s1, s0))
    target = shifted(t_fn, s1_fn, s0_fn, gain)
    want = [[t[i][j] + gain * (s1[i][j] - s0[i][j]) for j in range(3)] for i in range(3)]
    assert torch.allclose(target(torch.zeros(3)), torch.tensor(want))
    # One SGD step (momentum's first step is plain) of a linear model whose logits for the
    # one-hot input i are column i of its weight: dL/dz = T·(softmax(z/T) − softmax(y/T))/B.
    w0 = [[0.2, -0.1, 0.4], [0.0, 0.3, -0.2], [0.1, 0.1, 0.0]]
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(w0))
    temp, lr = 2.0, 0.5
    config = DistillConfig(
        temperature=temp, epochs=1, lr=lr, batch_size=3, optimizer=Optimizer.SGD, mixup=False
    )
    out = distill(model, lambda x: x @ torch.tensor(want), torch.eye(3), config)
    z = [[w0[j][i] for j in range(3)] for i in range(3)]  # logits of input i
    loss = 0.0
    w1 = [row[:] for row in w0]
    for i in range(3):
        p, q = _softmax(z[i], temp), _softmax(want[i], temp)
        loss += sum(b * math.log(b / a) for a, b in zip(p, q, strict=True)) * temp**2 / 3
        for j in range(3):
            w1[j][i] -= lr * temp * (p[j] - q[j]) / 3
    assert out.loss == pytest.approx(loss, rel=1e-5)
    assert torch.allclose(out.student.state_dict()["weight"], torch.tensor(w1), atol=1e-6)
    with pytest.raises(ValueError, match="gain"):
        shifted(target, target, target, -1.0)


def _track(store: VersionStore, learning: TeacherLearning) -> StudentTrack:
    assignment = StudentAssignment(
        budget_of=lambda node: 1000 if node in (3, 4) else 50_000, student_budget=2000
    )
    proxy = torch.rand(16, *TASK.load_data().x_train.shape[1:], generator=torch.Generator())
    config = DistillConfig(epochs=1, proxy_size=16, mixup=False)
    return StudentTrack(store, TASK, 0, proxy, config, 100, assignment, teacher_learning=learning)


def test_the_teacher_is_unchanged_when_the_students_learned_nothing(tmp_path: Path) -> None:
    g = _teacher()
    update = _track(VersionStore(tmp_path / "u"), TeacherLearning(3))
    s0 = dict(update.state)
    # the update target: the students did not move, so nothing is distilled
    assert update.teach(g, s0, 10, 20) is None and update.lessons == 0
    assert _track(VersionStore(tmp_path / "off"), TeacherLearning()).teach(g, s0, 10, 20) is None
    # they moved: the teacher learns from the average onwards, and only then
    update.state = _noisy(s0, 1, 0.05)
    taught = update.teach(g, s0, 10, 20)
    assert taught is not None and update.lessons == 1
    assert any(not torch.equal(taught[k], g[k]) for k in g)
    assert update.teach(g, s0, 10, 0) is None  # no student examples this round
    with pytest.raises(ValueError, match="example counts"):
        update.teach(g, s0, -1, 20)
    # the ensemble target: with a student equal in function to the teacher (here a student
    # built as the teacher's architecture, holding the teacher) the target is the teacher's
    # own logits; SGD then moves it by rounding-sized steps only
    same = _track(VersionStore(tmp_path / "e"), TeacherLearning(2, StudentToTeacher.ENSEMBLE))
    same._build_student = TASK.build_model
    same.state = dict(g)
    out = same.teach(g, g, 10, 20)
    assert out is not None
    for name, value in g.items():
        assert float((out[name] - value).abs().max()) <= 1e-5, name


def test_teacher_learning_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="epochs"):
        TeacherLearning(-1)
    with pytest.raises(TypeError, match="epochs"):
        TeacherLearning(2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="target"):
        TeacherLearning(1, "update")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step_ratio"):
        TeacherLearning(1, step_ratio=0.0)
    with pytest.raises(ValueError, match="lr"):
        TeacherLearning(1, lr=0.0)
    with pytest.raises(TypeError, match="optimizer"):
        TeacherLearning(1, optimizer="sgd")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="student-to-teacher-epochs"):
        RunSettings(student_refresh_every=1, student_to_teacher_epochs=-2)
    with pytest.raises(ConfigError, match="needs a student track"):
        RunSettings(student_to_teacher_epochs=2)
    with pytest.raises(ConfigError, match="student-to-teacher"):
        RunSettings.from_run_config({"student-refresh-every": 1, "student-to-teacher": "sideways"})
    with pytest.raises(ConfigError, match="student-to-teacher-epochs"):
        load_config(None, ["arms=adaptive", "arm.adaptive.student-to-teacher-epochs=3"])
    with pytest.raises(ConfigError, match="student-to-teacher-epochs"):
        load_config(None, ["arms=distill", "arm.distill.student-to-teacher-epochs=-1"])
    cfg = load_config(
        None,
        [
            "arms=distill",
            "arm.distill.student-to-teacher-epochs=3",
            "arm.distill.student-to-teacher=ensemble",
        ],
    )
    settings = cfg.run_settings(cfg.arms[0], "unused")
    assert settings.student_to_teacher_epochs == 3
    assert settings.student_to_teacher is StudentToTeacher.ENSEMBLE


def _round(tmp_path: Path, learning: TeacherLearning) -> tuple[State, State, StudentTrack]:
    """One round of two teacher and two student edges; the new teacher and student."""
    store = VersionStore(tmp_path)
    students = _track(store, learning)
    pushed: dict[str, PulledUpdate] = {}
    wrapper = CompressedStrategy(
        FedAvg(),
        store,
        _instruction,
        pushed.get,
        students=students,
        student_instruction=_instruction,
    )
    g = _teacher()
    random.seed(0)
    sent = list(wrapper.configure_train(1, ArrayRecord(g), ConfigRecord(), FakeGrid([1, 2, 3, 4])))  # type: ignore[arg-type]
    s0 = dict(students.state)
    models = {1: _noisy(g, 1), 2: _noisy(g, 2), 3: _noisy(s0, 3, 0.05), 4: _noisy(s0, 4, 0.05)}
    replies = []
    for msg in sent:
        node = msg.metadata.dst_node_id
        told = RoundInstruction.from_record(msg.content.config_records[CONTROL_KEY])
        base = g if node in (1, 2) else s0
        pushed[f"u{node}"] = PulledUpdate(
            encode_state(models[node], CodecSpec(), base), told.target, str(node)
        )
        receipt = TrainReceipt(f"u{node}", told.target, 10 * node, 0.1, 9, 5, 0, 0, 0)
        replies.append(_reply(msg, receipt))
    arrays, _ = wrapper.aggregate_train(1, replies)
    assert arrays is not None
    average = average_states([models[1], models[2]], [10, 20])
    return arrays.to_torch_state_dict(), average, students


@pytest.mark.usefixtures("flower_identity")
def test_the_strategy_teaches_the_teacher_only_when_asked(tmp_path: Path) -> None:
    off, average, students = _round(tmp_path / "off", TeacherLearning())
    for name, value in average.items():  # off: the plain average, as before
        assert torch.allclose(off[name], value, atol=1e-6), name
    assert students.lessons == 0
    on, average, students = _round(tmp_path / "on", TeacherLearning(2))
    assert students.lessons == 1
    assert any(not torch.allclose(on[k], average[k], atol=1e-6) for k in average)
    # the students' aggregate is the same either way: only the teacher learned
    again, _, off_students = _round(tmp_path / "again", TeacherLearning())
    assert all(torch.equal(students.state[k], off_students.state[k]) for k in students.state)
    assert all(torch.equal(again[k], off[k]) for k in off)
