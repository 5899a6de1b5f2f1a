"""Starting a run on a SuperLink with ``flwr run``, following it, and reading its outcome.

``flwr run APP CONNECTION --stream`` builds the app into a FAB, submits it, prints
``Successfully started run ID`` and then the ServerApp's log until the run ends; it
exits 0 whether the run completed or failed. The outcome comes from
``flwr ls CONNECTION --run-id ID --format json`` (``status``: ``finished:completed``,
``finished:failed``, ``finished:stopped``, or ``pending``/``starting``/``running``).
"""

from __future__ import annotations

import enum
import json
import logging
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from fedsqueeze.deploy.federation import CONNECTION_NAME, flower_tool
from fedsqueeze.deploy.processes import ManagedProcess, Output, ProcessSpec

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"Successfully started run (\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_WAITING = re.compile(r"Waiting for nodes to connect: (\d+) connected")
_FLOWER_ROUND = re.compile(r"\[ROUND (\d+)/(\d+)\]")
#: At most one "Waiting for nodes" line this often (Flower prints one a second).
WAITING_EVERY_S = 30.0
#: The coordinator's record of finished rounds (``coordinator/version_store.py``).
STATE_FILE = "state.json"


class RunStatus(enum.Enum):
    """A run's status as the SuperLink reports it."""

    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    COMPLETED = "finished:completed"
    FAILED = "finished:failed"
    STOPPED = "finished:stopped"
    UNKNOWN = "unknown"

    @property
    def finished(self) -> bool:
        """Whether the run has ended (any way)."""
        return self.value.startswith("finished")


@dataclass(frozen=True)
class RunOutcome:
    """What became of a run.

    Attributes
    ----------
    run_id
        Flower's run id.
    status
        Its status.
    details
        Flower's explanation (for a failed run, the ServerApp's exception).
    """

    run_id: int
    status: RunStatus
    details: str = ""


@dataclass(frozen=True)
class RoundSummary:
    """One finished round, as the coordinator recorded it.

    ``accepted`` updates went into the aggregate; ``failed`` edges replied with an error
    (their fetch or training raised), ``rejected`` updates were refused, ``dropped``
    edges never replied; ``aggregated`` is false for a round that trained nothing.
    """

    server_round: int
    accuracy: float
    loss: float
    bytes_down: int
    bytes_up: int
    accepted: int = 0
    failed: int = 0
    rejected: int = 0
    dropped: int = 0
    aggregated: bool = True


def flwr_run_spec(app_dir: Path, run_config: Path, env: Mapping[str, str]) -> ProcessSpec:
    """``flwr run APP fedsqueeze --run-config FILE --stream``, its output piped."""
    argv = (
        flower_tool("flwr"),
        "run",
        str(app_dir),
        CONNECTION_NAME,
        "--run-config",
        str(run_config),
        "--stream",
    )
    return ProcessSpec("flwr run", argv, env, Output.PIPE)


class RunLog:
    """Copies the output of ``flwr run --stream`` and remembers the run id it announces.

    Two of Flower's lines are edited on the way:

    * ``Waiting for nodes to connect: N connected`` comes every second while a round
      waits for edges; it is shown when the count changes, else once per
      ``waiting_every_s``, with how many were left out;
    * ``[ROUND i/k]`` counts the rounds of this Flower run, which after ``--resume``
      are not the run's rounds: ``round_offset`` (the rounds completed before) is
      added next to it (``[ROUND 1/3]  = fedsqueeze round 6 of 8``).

    Parameters
    ----------
    sink
        Where the lines go (the terminal).
    color
        Keep Flower's ANSI colors (for a terminal); strip them otherwise.
    round_offset
        Rounds completed before this Flower run (``--resume``).
    waiting_every_s
        Least seconds between two "Waiting for nodes" lines with the same count.
    clock
        Injected for tests.
    """

    def __init__(
        self,
        sink: TextIO,
        *,
        color: bool = True,
        round_offset: int = 0,
        waiting_every_s: float = WAITING_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink = sink
        self.color = color
        self.round_offset = round_offset
        self.waiting_every_s = waiting_every_s
        self.clock = clock
        self.run_id: int | None = None
        self._waiting: tuple[int, float] | None = None  # (count shown, when)
        self._held_back = 0

    def follow(self, process: ManagedProcess) -> int | None:
        """Copy lines until the stream ends and the process exits; returns the run id."""
        for line in process.stdout:
            self.feed(line)
        process.wait()
        return self.run_id

    def feed(self, line: str) -> None:
        """Handle one line of ``flwr run``'s output."""
        plain = _ANSI.sub("", line)
        if self.run_id is None and (match := _RUN_ID.search(plain)):
            self.run_id = int(match.group(1))
        out = line if self.color else plain
        if (waiting := _WAITING.search(plain)) is not None:
            shown = self._waiting_line(int(waiting.group(1)), out)
            if shown is None:
                return
            out = shown
        else:
            self._waiting = None
            out = self._round_line(out)
        self.sink.write(out)
        self.sink.flush()

    def _waiting_line(self, count: int, line: str) -> str | None:
        now = self.clock()
        if self._waiting is not None:
            last_count, when = self._waiting
            if count == last_count and now - when < self.waiting_every_s:
                self._held_back += 1
                return None
        changed = self._waiting is not None and self._waiting[0] != count
        self._waiting = (count, now)
        held, self._held_back = self._held_back, 0
        if held and not changed:
            note = f"  ({held} more such line(s) left out; one every {self.waiting_every_s:.0f} s)"
            line = line.rstrip("\n") + note + "\n"
        return line

    def _round_line(self, line: str) -> str:
        if not self.round_offset:
            return line
        match = _FLOWER_ROUND.search(_ANSI.sub("", line))
        if match is None:
            return line
        ours = int(match.group(1)) + self.round_offset
        total = int(match.group(2)) + self.round_offset
        note = f"  = fedsqueeze round {ours} of {total} (resumed after round {self.round_offset})"
        return line.rstrip("\n") + note + "\n"


def query_run(run_id: int, env: Mapping[str, str], *, timeout: float = 60.0) -> RunOutcome:
    """The run's status from ``flwr ls`` (``UNKNOWN`` if the SuperLink cannot say)."""
    argv = [flower_tool("flwr"), "ls", CONNECTION_NAME, "--run-id", str(run_id)]
    try:
        done = subprocess.run(
            [*argv, "--format", "json"],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return RunOutcome(run_id, RunStatus.UNKNOWN, f"flwr ls failed: {exc}")
    return parse_run_listing(run_id, done.stdout)


def parse_run_listing(run_id: int, text: str) -> RunOutcome:
    """A :class:`RunOutcome` from the JSON ``flwr ls --format json`` prints."""
    start = text.find("{")
    try:
        payload = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        payload = {}
    for run in payload.get("runs", []):
        if str(run.get("run-id")) == str(run_id):
            try:
                status = RunStatus(str(run.get("status", "")))
            except ValueError:
                status = RunStatus.UNKNOWN
            return RunOutcome(run_id, status, str(run.get("status-details", "")))
    detail = payload.get("error-message") or text.strip()[-300:] or "no answer"
    return RunOutcome(run_id, RunStatus.UNKNOWN, str(detail))


def wait_for_outcome(run_id: int, env: Mapping[str, str], *, patience: float = 20.0) -> RunOutcome:
    """Poll :func:`query_run` until the run has finished, for up to ``patience`` seconds.

    The log stream can end a moment before the SuperLink records the final status.
    """
    deadline = time.monotonic() + patience
    while True:
        outcome = query_run(run_id, env)
        if outcome.status.finished or time.monotonic() > deadline:
            return outcome
        time.sleep(1.0)


def stop_run(run_id: int, env: Mapping[str, str], *, timeout: float = 30.0) -> bool:
    """Ask the SuperLink to stop a run (``flwr stop``); whether it agreed."""
    argv = [flower_tool("flwr"), "stop", str(run_id), CONNECTION_NAME]
    try:
        done = subprocess.run(
            argv, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("could not stop run %d: %s", run_id, exc)
        return False
    return done.returncode == 0


def read_round_summaries(state_dir: Path) -> list[RoundSummary]:
    """The rounds recorded in the coordinator's state directory (empty if none)."""
    try:
        raw = json.loads((state_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    rows = []
    metrics = raw.get("round_metrics", {}) if isinstance(raw, dict) else {}
    for key, values in sorted(metrics.items(), key=lambda kv: int(kv[0])):
        rows.append(_round_summary(int(key), values))
    return rows


def _round_summary(server_round: int, values: Mapping[str, float]) -> RoundSummary:
    return RoundSummary(
        server_round,
        float(values.get("accuracy", float("nan"))),
        float(values.get("loss", float("nan"))),
        int(values.get("bytes-down", 0)),
        int(values.get("bytes-up", 0)),
        accepted=int(values.get("updates-accepted", 0)),
        failed=int(values.get("edges-failed", 0)),
        rejected=int(values.get("updates-rejected", 0)),
        dropped=int(values.get("edges-dropped", 0)),
        aggregated=not values.get("round-failed", 0.0),
    )


def format_summaries(rows: list[RoundSummary]) -> str:
    """A plain-text table of rounds, with totals; a round that trained nothing says so."""
    lines = [
        f"{'round':>5}  {'accuracy':>8}  {'loss':>7}  {'bytes down':>12}  {'bytes up':>12}  "
        f"{'accepted':>8}  {'failed':>6}  {'rejected':>8}  {'dropped':>7}"
    ]
    for r in rows:
        note = "" if r.aggregated else "  FAILED: nothing aggregated"
        lines.append(
            f"{r.server_round:>5}  {r.accuracy:>8.4f}  {r.loss:>7.4f}  "
            f"{r.bytes_down:>12,}  {r.bytes_up:>12,}  {r.accepted:>8}  {r.failed:>6}  "
            f"{r.rejected:>8}  {r.dropped:>7}{note}"
        )
    down, up = sum(r.bytes_down for r in rows), sum(r.bytes_up for r in rows)
    lines.append(
        f"{'total':>5}  {'':>8}  {'':>7}  {down:>12,}  {up:>12,}  "
        f"{sum(r.accepted for r in rows):>8}  {sum(r.failed for r in rows):>6}  "
        f"{sum(r.rejected for r in rows):>8}  {sum(r.dropped for r in rows):>7}"
    )
    return "\n".join(lines)


def failed_rounds(rows: list[RoundSummary]) -> list[int]:
    """The rounds that aggregated nothing."""
    return [r.server_round for r in rows if not r.aggregated]
