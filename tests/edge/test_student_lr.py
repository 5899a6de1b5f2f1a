"""Student edges train at the run's ``student-lr``; teacher edges at ``lr``."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import RecordDict as CommonRecordDict

import edge.app
from fedsqueeze.control import TRACK_CONFIG_KEY, ModelTrack
from fedsqueeze.runconfig import RunSettings
from fedsqueeze.tasks import TrainResult, get_task

TASK = get_task("digits-cnn")


def _message(student: bool) -> Message:
    build = TASK.build_student if student else TASK.build_model
    assert build is not None
    config: dict[str, Any] = {"server-round": 1}
    if student:
        config[TRACK_CONFIG_KEY] = ModelTrack.STUDENT.value
    content = RecordDict(
        {"arrays": ArrayRecord(build(0).state_dict()), "config": ConfigRecord(config)}
    )
    return Message(content=content, dst_node_id=1, message_type="train")


@pytest.mark.usefixtures("flower_identity")
@pytest.mark.parametrize(
    ("student", "settings", "want"),
    [
        (True, RunSettings(lr=0.1, student_lr=0.02), 0.02),
        (False, RunSettings(lr=0.1, student_lr=0.02), 0.1),
        (True, RunSettings(lr=0.1), 0.1),  # 0: the run's lr
    ],
)
def test_student_edges_train_at_the_student_lr(
    monkeypatch: pytest.MonkeyPatch, student: bool, settings: RunSettings, want: float
) -> None:
    seen: list[float] = []

    def train(model: object, x: object, y: object, **kwargs: Any) -> TrainResult:
        seen.append(kwargs["lr"])
        return TrainResult(loss=0.0, num_examples=1, seconds=0.0)

    monkeypatch.setattr(edge.app, "get_task", lambda name: dataclasses.replace(TASK, train=train))
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=CommonRecordDict(),
        run_config={},
    )
    edge.app.train_on_partition(_message(student), context, settings)
    assert seen == [want]
