"""The ``distill`` sweep arm end to end: 2 rounds, 6 clients, half of them on 2g.

The 2g clients train the student (its own track, refreshed from the teacher after every
round here), the others the teacher; beside it the baseline ``student-fedavg``, whose 2g
clients train the student without ever a refresh. A subprocess with a hard timeout.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from coordinator.budget import DOWN_OVERHEAD_BYTES, UP_OVERHEAD_BYTES, LadderPolicy
from coordinator.version_store import VersionStore
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.tasks import get_task
from simulations.baselines import (
    ADAPTIVE_UP_LADDER,
    ARM_PRESETS,
    STUDENT_DOWN_BUDGET,
    STUDENT_UP_BUDGET,
)
from tests.subproc import run_module


def test_the_student_budgets_follow_their_stated_principle(tmp_path: Path) -> None:
    """``adaptive``'s payload allowance scaled by the student/teacher parameter ratio, the
    fixed message overheads added back, the upload raised to the smallest rung's bound:
    recomputed from the models and the ladder, so a change to either shows here."""
    task = get_task("digits-cnn")
    assert task.build_student is not None
    teacher = dict(task.build_model(0).state_dict())
    student = dict(task.build_student(0).state_dict())
    ratio = sum(v.numel() for v in student.values()) / sum(v.numel() for v in teacher.values())
    assert ratio <= 0.25  # the student: at most a quarter of the teacher
    adaptive = ARM_PRESETS["adaptive"]
    down = DOWN_OVERHEAD_BYTES + round((adaptive.down_budget - DOWN_OVERHEAD_BYTES) * ratio)
    up = UP_OVERHEAD_BYTES + round((adaptive.up_budget - UP_OVERHEAD_BYTES) * ratio)
    policy = LadderPolicy(VersionStore(tmp_path), ("quant=8",), ADAPTIVE_UP_LADDER)
    smallest = min(policy._up_sizes(t, parse_spec(t), student).floor for t in ADAPTIVE_UP_LADDER)
    assert up < smallest  # the scaled upload fits no rung: the floor decides
    assert (down, max(up, smallest)) == (STUDENT_DOWN_BUDGET, STUDENT_UP_BUDGET)


@pytest.mark.timeout(400)
def test_distill_arm_trains_the_student_on_weak_links(tmp_path: Path) -> None:
    args = ["sweep", "-v", "--config", "smoke", "--out", str(tmp_path)]
    sets = (
        "arms=distill,student-fedavg",
        "num-rounds=2",
        "links=2g:0.5,4g:0.5",
        "arm.distill.student-refresh-every=1",
    )
    for s in sets:
        args += ["--set", s]
    proc = run_module("tests.simulations.cli_run", *args, timeout=380, ray=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    with (tmp_path / "results.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["round"] != "0"]
    assert len(rows) == 4  # two rounds of each arm
    for row in rows:
        assert row["clients_failed"] == "0"
    with (tmp_path / "clients.csv").open() as fh:
        clients = list(csv.DictReader(fh))
    assert clients and all(r["bytes_down"] for r in clients)
    # distill's two refreshes; the baseline never distils
    assert output.count("student refreshed from the teacher") == 2
    assert len(re.findall(r"updates accepted \([1-9]\d* to the student\)", output)) == 4, output[
        -3000:
    ]
