"""`fedsqueeze distill`: a short offline run, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsqueeze.cli import main
from fedsqueeze.statefile import load_state, save_state
from fedsqueeze.tasks import get_task


def test_distill_writes_a_student_of_the_tasks_architecture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = get_task("digits-mlp")
    teacher = tmp_path / "teacher.pt"
    save_state(task.build_model(0).state_dict(), teacher)
    out = tmp_path / "student.safetensors"
    argv = ["distill", str(out), "--task", "digits-mlp", "--teacher", str(teacher)]
    assert main([*argv, "--epochs", "1", "--proxy-size", "64"]) == 0
    assert task.build_student is not None
    want = task.build_student(0).state_dict()
    got = load_state(out)
    assert got.keys() == want.keys()
    assert all(got[k].shape == want[k].shape for k in want)
    assert not torch.equal(got["fc1.weight"], want["fc1.weight"])  # it trained
    text = capsys.readouterr().out
    assert "student: 6,570 parameters" in text and "64 unlabelled examples" in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task", "nosuch"], "unknown task 'nosuch'"),
        (["--teacher", "TEACHER_CNN", "--task", "digits-mlp"], "does not fit the task's model"),
        (["--teacher", "MISSING"], "no such file"),
        (["--proxy-size", "5000"], "--proxy-size must be < 1437"),
        (["--ce-weight", "2"], "--ce-weight must be in [0, 1]"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    cnn = tmp_path / "cnn.pt"
    save_state(get_task("digits-cnn").build_model(0).state_dict(), cnn)
    extra = [
        str(cnn) if e == "TEACHER_CNN" else str(tmp_path / "nope.pt") if e == "MISSING" else e
        for e in extra
    ]
    out = tmp_path / "student.pt"
    assert main(["distill", str(out), "--epochs", "1", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize(
    ("name", "flags", "message"),
    [
        ("s.fsq", [], "an .fsq output needs --compress"),
        ("s.pt", ["--compress"], "name it *.fsq"),
        ("s.txt", [], "cannot tell the format"),
    ],
)
def test_outputs_are_checked_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, flags: list[str], message: str
) -> None:
    assert main(["distill", str(tmp_path / name), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
