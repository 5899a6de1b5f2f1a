"""A short sweep end to end on Flower's simulation engine, as `fedsqueeze sweep` runs it.

Two strategies (plain Flower FedAvg fp32 and fedsqueeze adaptive with per-client
budgets), 3 rounds, 6 clients, 3 per round. Each run is a subprocess with a hard
timeout: a misconfigured Flower simulation can log an error and then hang.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from simulations.config import load_config
from simulations.grid import sample_partitions
from simulations.server import model_bytes
from tests.shared_once import made_once
from tests.subproc import run_module

ROOT = Path(__file__).resolve().parents[2]
DOWN_BUDGET, UP_BUDGET, FRACTION = 6_000, 3_000, 1 / 60
#: Flower frames each fp32 tensor as a .npy file (128-byte header) inside its protobuf
#: message: 1.06 % on the 8 tensors of the digits CNN. Anything more would be a bug.
BASELINE_FRAMING = 0.015
BUDGET_FLAGS = (
    f"arm.adaptive.down-budget={DOWN_BUDGET}",
    f"arm.adaptive.up-budget={UP_BUDGET}",
    f"arm.adaptive.budget-fraction={FRACTION}",
)


def _sweep(out: Path, *sets: str) -> Path:
    args = ["sweep", "--config", "smoke", "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    proc = run_module("tests.simulations.cli_run", *args, timeout=400, ray=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "target accuracy" in proc.stdout  # the summary table was printed
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # once per session, whichever workers run this module's tests (tests/shared_once.py)
    return made_once(tmp_path_factory, "short-sweep", lambda out: _sweep(out, *BUDGET_FLAGS))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_outputs_and_columns(sweep: Path) -> None:
    for name in (
        "results.csv",
        "clients.csv",
        "summary.json",
        "summary.md",
        "accuracy_vs_mb.png",
        "accuracy_vs_time.png",
    ):
        assert (sweep / name).stat().st_size > 0, name
    rows = _rows(sweep / "results.csv")
    for column in (
        "arm",
        "round",
        "accuracy",
        "loss",
        "bytes_down",
        "bytes_up",
        "sim_time_s",
        "clients_dropped",
    ):
        assert column in rows[0]
    assert {(r["arm"], r["round"]) for r in rows} == {
        (arm, str(n)) for arm in ("fedavg-fp32", "adaptive") for n in range(4)
    }
    summary = json.loads((sweep / "summary.json").read_text())
    assert [a["arm"] for a in summary["arms"]] == ["fedavg-fp32", "adaptive"]
    for arm in summary["arms"]:
        for key in (
            "final_accuracy",
            "best_accuracy",
            "total_bytes",
            "bytes_to_target",
            "time_to_target_s",
            "ratio_total_bytes",
        ):
            assert key in arm
    assert summary["arms"][0]["ratio_total_bytes"] == 1.0
    assert summary["arms"][1]["ratio_total_bytes"] > 10


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bytes_are_counted_both_ways_and_the_baseline_honestly(sweep: Path) -> None:
    config = load_config(ROOT / "simulations" / "configs" / "smoke.toml")
    model = model_bytes(config.task, config.seed)
    for row in _rows(sweep / "results.csv"):
        if row["round"] == "0":
            continue
        assert int(row["bytes_down"]) > 0 and int(row["bytes_up"]) > 0
        assert float(row["sim_time_s"]) > 0
        if row["arm"] == "adaptive":
            assert int(row["data_bytes_down"]) > 0 and int(row["data_bytes_up"]) > 0
            assert int(row["control_bytes_down"]) > 0 and int(row["control_bytes_up"]) > 0
        else:
            sampled = int(row["clients_sampled"])
            floor = model * sampled * 2
            total = int(row["bytes_down"]) + int(row["bytes_up"])
            assert floor < total < floor * (1 + BASELINE_FRAMING), (total, floor)
            assert int(row["data_bytes_down"]) == int(row["data_bytes_up"]) == 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_budget_policy_never_exceeds_a_clients_budget(sweep: Path) -> None:
    config = load_config(ROOT / "simulations" / "configs" / "smoke.toml")
    clients = [r for r in _rows(sweep / "clients.csv") if r["arm"] == "adaptive"]
    assert len(clients) == config.num_rounds * config.clients_per_round
    for r in clients:
        assert int(r["data_bytes_down"]) <= DOWN_BUDGET, r
        assert int(r["data_bytes_up"]) <= UP_BUDGET, r
        assert r["down_spec"] and r["up_spec"]
    # and the run's total budget (a fraction of what fp32 FedAvg would move)
    total = FRACTION * model_bytes(config.task, config.seed) * 2
    total *= config.clients_per_round * config.num_rounds
    spent = sum(int(r["data_bytes_down"]) + int(r["data_bytes_up"]) for r in clients)
    assert spent <= total


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_client_that_is_not_sampled_is_sent_nothing(sweep: Path) -> None:
    """Per arm and round, exactly the sampled clients were contacted (3 of 6 here): every
    client that heard from the server replies, and its reply is in clients.csv; the
    fedsqueeze arm's data plane is pull-only, so only instructed clients fetch."""
    config = load_config(ROOT / "simulations" / "configs" / "smoke.toml")
    rows = _rows(sweep / "clients.csv")
    arms = {r["arm"] for r in rows}
    assert arms == {"fedavg-fp32", "adaptive"}
    for arm in arms:
        for server_round in range(1, config.num_rounds + 1):
            heard = sorted(
                int(r["partition"])
                for r in rows
                if r["arm"] == arm and int(r["round"]) == server_round
            )
            sampled = sample_partitions(
                config.seed, server_round, config.num_clients, config.clients_per_round
            )
            assert heard == list(sampled), (arm, server_round)
    results = [r for r in _rows(sweep / "results.csv") if int(r["round"]) > 0]
    assert all(int(r["clients_sampled"]) == config.clients_per_round for r in results)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_payloads_inline_change_where_bytes_travel_not_what_is_learned(
    sweep: Path, tmp_path: Path
) -> None:
    """The same sweep with ``inline-bytes``: the adaptive arm's payloads ride inside the
    Flower messages. The model learns exactly the same (the payloads are the same bytes),
    the data plane carries nothing, every byte is still counted (per round, the sum of
    the clients' rows), and the arm moves fewer bytes in all (no data-plane framing).

    It is also the sweep run again: the same config gives the same partitions, sampling
    and links, and the arm it does not touch (fedavg-fp32) the same metrics and bytes
    (within the node ids' varint noise)."""
    inline = _sweep(tmp_path / "inline", *BUDGET_FLAGS, "arm.adaptive.inline-bytes=4096")
    plain = {(r["arm"], r["round"]): r for r in _rows(sweep / "results.csv")}
    for row in _rows(inline / "results.csv"):
        if row["arm"] != "fedavg-fp32":
            continue
        before = plain[(row["arm"], row["round"])]
        for key in ("accuracy", "loss", "clients_sampled"):
            assert row[key] == before[key], (row["arm"], row["round"], key)
        for key in ("bytes_down", "bytes_up"):
            assert abs(int(row[key]) - int(before[key])) <= 64, (row["arm"], row["round"], key)
    a = [(r["arm"], r["round"], r["partition"], r["link"]) for r in _rows(sweep / "clients.csv")]
    b = [(r["arm"], r["round"], r["partition"], r["link"]) for r in _rows(inline / "clients.csv")]
    assert a == b and a
    clients = [r for r in _rows(inline / "clients.csv") if r["arm"] == "adaptive"]
    plain_clients = {
        (r["round"], r["partition"]): r
        for r in _rows(sweep / "clients.csv")
        if r["arm"] == "adaptive"
    }
    saved = 0
    for row in _rows(inline / "results.csv"):
        if row["arm"] != "adaptive" or row["round"] == "0":
            continue
        before = plain[("adaptive", row["round"])]
        assert row["accuracy"] == before["accuracy"] and row["loss"] == before["loss"]
        assert int(row["data_bytes_down"]) == int(row["data_bytes_up"]) == 0
        mine = [r for r in clients if r["round"] == row["round"]]
        assert sum(int(r["bytes_down"]) for r in mine) == int(row["bytes_down"])
        assert sum(int(r["bytes_up"]) for r in mine) == int(row["bytes_up"])
        for r in mine:
            assert int(r["data_bytes_down"]) == int(r["data_bytes_up"]) == 0
            was = plain_clients[(r["round"], r["partition"])]
            total = int(r["bytes_down"]) + int(r["bytes_up"])
            # at most the inline limit's field more (no payload inline) and node-id noise
            assert total <= int(was["bytes_down"]) + int(was["bytes_up"]) + 64 + 4, (r, was)
        saved += int(before["bytes_down"]) + int(before["bytes_up"])
        saved -= int(row["bytes_down"]) + int(row["bytes_up"])
    assert saved > 0
