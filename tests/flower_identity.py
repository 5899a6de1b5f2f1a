"""Flower creates instruction messages only inside a run; tests give it an identity."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def flower_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)
    yield
