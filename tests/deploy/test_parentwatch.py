"""A Flower app process ends when its parent exits, even when the parent is left a zombie.

The CI machine's init does not reap: a killed coordinator's SuperExec stayed a zombie
there, Flower's ``kill(pid, 0)`` check took it for alive, and the ServerApp ran on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from fedsqueeze.deploy.parentwatch import (
    flower_parent_pid,
    parent_has_exited,
    watch_flower_parent,
)
from fedsqueeze.deploy.proctree import is_alive, read_stat

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux /proc")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/v/bin/flwr-serverapp", "--runtime-api-address", "a:1", "--parent-pid", "42"], 42),
        (["flwr-clientapp", "--parent-pid=77", "--insecure"], 77),
        (["/v/bin/flwr-serverapp", "--insecure"], None),  # no flag: Flower does not watch
        (["pytest", "--parent-pid", "42"], None),  # another program's flag
        (["flwr-serverapp", "--parent-pid", "x"], None),
        (["flwr-serverapp", "--parent-pid", "1"], None),  # init is never "the parent"
        (["flwr-serverapp", "--parent-pid"], None),
        ([], None),
    ],
)
def test_the_parent_pid_is_read_from_a_flower_app_command_line(
    argv: list[str], expected: int | None
) -> None:
    assert flower_parent_pid(argv) == expected


def test_no_watch_outside_a_flower_app() -> None:
    # A simulation runs the apps inside its own process: nothing to watch there.
    assert watch_flower_parent(["python", "-m", "pytest"]) is None


def test_a_live_parent_has_not_exited() -> None:
    assert not parent_has_exited(os.getppid(), was_parent=True)
    assert not parent_has_exited(os.getpid(), was_parent=False)


# P starts C in its own session and exits; the test (P's parent) does not reap P yet.
_PARENT = textwrap.dedent(
    """
    import os, subprocess, sys
    child = subprocess.Popen(
        [sys.executable, "-c", sys.argv[1], str(os.getpid())], start_new_session=True
    )
    print(child.pid, flush=True)
    sys.stdin.readline()  # until the test says go
    os._exit(0)
    """
)
_CHILD = textwrap.dedent(
    """
    import sys, time
    from fedsqueeze.deploy.parentwatch import watch_flower_parent
    assert watch_flower_parent(["flwr-serverapp", "--parent-pid", sys.argv[1]], interval=0.1)
    try:
        time.sleep(120)
    except KeyboardInterrupt:
        sys.exit(3)
    """
)


@pytest.mark.timeout(120)
def test_the_app_ends_when_its_parent_exits_and_stays_a_zombie() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, _CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdin is not None and parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        time.sleep(1.0)  # the watch is running and sees a live parent
        assert is_alive(child)
        parent.stdin.write("go\n")
        parent.stdin.flush()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stat = read_stat(parent.pid)
            if stat is not None and stat.state == "Z":
                break
            time.sleep(0.05)
        zombie = read_stat(parent.pid)
        assert zombie is not None and zombie.state == "Z"
        # What Flower checks: kill(pid, 0) succeeds on the unreaped parent; the watch
        # counts a zombie as exited even where the pid was never its parent.
        os.kill(parent.pid, 0)
        assert parent_has_exited(parent.pid, was_parent=False)
        while is_alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_alive(child), "the app outlived its (zombie) parent"
        # Still unreaped: the watch did not wait for someone to reap it.
        still = read_stat(parent.pid)
        assert still is not None and still.state == "Z"
    finally:
        if is_alive(child):
            os.kill(child, 9)
        parent.stdin.close()
        parent.stdout.close()
        parent.wait(timeout=10)
