"""Following ``flwr run``, reading ``flwr ls`` and the coordinator's round record."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

from fedsqueeze.deploy.federation import CONNECTION_NAME
from fedsqueeze.deploy.processes import Output, ProcessSpec, Supervisor
from fedsqueeze.deploy.runs import (
    RunLog,
    RunStatus,
    failed_rounds,
    flwr_run_spec,
    format_summaries,
    parse_run_listing,
    read_round_summaries,
)

_LISTING = {
    "success": True,
    "runs": [
        {
            "run-id": "9242948619313358209",
            "status": "finished:failed",
            "status-details": "ServerApp failed with exception: unknown task 'nope'",
        },
        {"run-id": "17", "status": "finished:completed", "status-details": ""},
        {"run-id": "18", "status": "running", "status-details": ""},
    ],
}


def test_the_listing_gives_each_runs_status() -> None:
    text = "some banner\n" + json.dumps(_LISTING)
    failed = parse_run_listing(9242948619313358209, text)
    assert failed.status is RunStatus.FAILED and "unknown task" in failed.details
    assert parse_run_listing(17, text).status is RunStatus.COMPLETED
    running = parse_run_listing(18, text)
    assert running.status is RunStatus.RUNNING and not running.status.finished
    assert RunStatus.STOPPED.finished


def test_an_unreadable_listing_is_unknown() -> None:
    assert parse_run_listing(1, "").status is RunStatus.UNKNOWN
    assert parse_run_listing(1, "{not json").status is RunStatus.UNKNOWN
    missing = parse_run_listing(99, json.dumps(_LISTING))
    assert missing.status is RunStatus.UNKNOWN
    weird = parse_run_listing(5, json.dumps({"runs": [{"run-id": "5", "status": "new"}]}))
    assert weird.status is RunStatus.UNKNOWN


def test_the_run_log_is_copied_and_the_run_id_found() -> None:
    script = (
        "print('Using SuperLink: fedsqueeze (127.0.0.1:8000)');"
        "print('\\x1b[32mSuccessfully started run 4242\\x1b[0m');"
        "print('\\x1b[92mINFO \\x1b[0m: [ROUND 1/2]')"
    )
    spec = ProcessSpec("flwr run", (sys.executable, "-c", script), dict(os.environ), Output.PIPE)
    sink = io.StringIO()
    with Supervisor() as supervisor:
        run_id = RunLog(sink, color=False).follow(supervisor.start(spec))
    assert run_id == 4242
    assert sink.getvalue().splitlines() == [
        "Using SuperLink: fedsqueeze (127.0.0.1:8000)",
        "Successfully started run 4242",
        "INFO : [ROUND 1/2]",
    ]


def test_flwr_run_streams_the_generated_app(tmp_path: Path) -> None:
    spec = flwr_run_spec(tmp_path / "app", tmp_path / "run-config.toml", {})
    assert spec.output is Output.PIPE
    assert spec.argv[1:] == (
        "run",
        str(tmp_path / "app"),
        CONNECTION_NAME,
        "--run-config",
        str(tmp_path / "run-config.toml"),
        "--stream",
    )


def test_round_summaries_come_from_state_json(tmp_path: Path) -> None:
    assert read_round_summaries(tmp_path) == []
    (tmp_path / "state.json").write_text(
        json.dumps(
            {
                "completed_round": 2,
                "round_metrics": {
                    "10": {"accuracy": 0.9, "loss": 0.3, "bytes-down": 5.0, "bytes-up": 6.0},
                    "2": {"accuracy": 0.5, "loss": 1.5, "bytes-down": 1000.0, "bytes-up": 20.0},
                },
            }
        )
    )
    rows = read_round_summaries(tmp_path)
    assert [r.server_round for r in rows] == [2, 10]
    assert rows[0].bytes_down == 1000 and rows[1].accuracy == 0.9
    table = format_summaries(rows)
    assert "1,005" in table.splitlines()[-1] and "26" in table.splitlines()[-1]
    (tmp_path / "state.json").write_text("{broken")
    assert read_round_summaries(tmp_path) == []


def test_the_summary_counts_who_missed_each_round_and_marks_rounds_that_trained_nothing(
    tmp_path: Path,
) -> None:
    ok = {"accuracy": 0.5, "loss": 1.0, "bytes-down": 10.0, "bytes-up": 5.0}
    (tmp_path / "state.json").write_text(
        json.dumps(
            {
                "completed_round": 2,
                "round_metrics": {
                    "1": {**ok, "updates-accepted": 2.0, "edges-dropped": 1.0, "round-failed": 0.0},
                    "2": {
                        **ok,
                        "updates-accepted": 0.0,
                        "edges-failed": 2.0,
                        "updates-rejected": 1.0,
                        "round-failed": 1.0,
                    },
                },
            }
        )
    )
    rows = read_round_summaries(tmp_path)
    assert (rows[0].accepted, rows[0].dropped, rows[0].aggregated) == (2, 1, True)
    assert (rows[1].failed, rows[1].rejected, rows[1].aggregated) == (2, 1, False)
    assert failed_rounds(rows) == [2]
    header, first, second, total = format_summaries(rows).splitlines()
    assert header.split()[-4:] == ["accepted", "failed", "rejected", "dropped"]
    assert first.split()[-4:] == ["2", "0", "0", "1"] and "FAILED" not in first
    assert second.split()[5:9] == ["0", "2", "1", "0"]
    assert second.endswith("FAILED: nothing aggregated")
    assert total.split()[-4:] == ["2", "2", "1", "1"]


def _waiting(count: int) -> str:
    return f"INFO :      Waiting for nodes to connect: {count} connected (minimum required: 2).\n"


def test_waiting_lines_are_shown_when_the_count_changes_or_once_per_interval() -> None:
    now = [0.0]
    sink = io.StringIO()
    run_log = RunLog(sink, color=False, waiting_every_s=30, clock=lambda: now[0])
    for second in range(300):  # five minutes of Flower's one line a second
        now[0] = float(second)
        run_log.feed(_waiting(0 if second < 200 else 1))
    run_log.feed("INFO :      configure_train: Sampled 2 nodes (out of 2)\n")
    lines = sink.getvalue().splitlines()
    waiting = [line for line in lines if "Waiting for nodes" in line]
    # 0 s, 30 s, …, 180 s for "0 connected"; 200 s (changed), 230 s, 260 s, 290 s
    assert len(waiting) == 11
    assert "1 connected" in waiting[7] and "left out" not in waiting[7]
    assert "(29 more such line(s) left out; one every 30 s)" in waiting[1]
    assert lines[-1].endswith("Sampled 2 nodes (out of 2)")


def test_after_a_resume_flowers_rounds_are_labelled_with_ours() -> None:
    sink = io.StringIO()
    run_log = RunLog(sink, color=False, round_offset=5)
    run_log.feed("\x1b[92mINFO \x1b[0m:      [ROUND 1/3]\n")
    run_log.feed("INFO :      [ROUND 3/3]\n")
    first, last = sink.getvalue().splitlines()
    assert first == "INFO :      [ROUND 1/3]  = fedsqueeze round 6 of 8 (resumed after round 5)"
    assert last.endswith("= fedsqueeze round 8 of 8 (resumed after round 5)")
    fresh = io.StringIO()
    RunLog(fresh, color=False).feed("INFO :      [ROUND 1/3]\n")
    assert fresh.getvalue() == "INFO :      [ROUND 1/3]\n"
