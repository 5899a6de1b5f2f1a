"""A Ray start that times out is retried, then a clear error: never a hang."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import pytest

from simulations import engine

Install = Callable[[int], "FakeRay"]


class FakeRay:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.inits: list[dict[str, object]] = []
        self.shutdowns = 0
        self.running = False

    def is_initialized(self) -> bool:
        return self.running

    def init(self, **kwargs: object) -> None:
        self.inits.append(kwargs)
        # What Ray 2.55's ray.init says on every start (make demo printed it).
        warnings.warn(
            "Tip: In future versions of Ray, Ray will no longer override accelerator "
            "visible devices env var if num_gpus=0 or num_gpus=None (default). To enable "
            "this behavior and turn off this error message, set "
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0",
            FutureWarning,
            stacklevel=2,
        )
        if len(self.inits) <= self.failures:
            raise Exception("The current node timed out during startup.")
        self.running = True

    def shutdown(self) -> None:
        self.shutdowns += 1


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> Install:
    import ray

    def install(failures: int) -> FakeRay:
        fake = FakeRay(failures)
        for name in ("is_initialized", "init", "shutdown"):
            monkeypatch.setattr(ray, name, getattr(fake, name))
        monkeypatch.setattr(time, "sleep", lambda s: None)
        monkeypatch.delenv(engine.RAY_ADDRESS_ENV, raising=False)
        return fake

    return install


def test_a_start_that_times_out_is_retried(fake_ray: Install) -> None:
    fake = fake_ray(2)
    engine.start_ray({"num_cpus": 2})
    assert fake.running and len(fake.inits) == 3 and fake.shutdowns == 2
    assert fake.inits[-1]["num_cpus"] == 2 and fake.inits[-1]["include_dashboard"] is False
    runtime_env = fake.inits[-1]["runtime_env"]
    assert isinstance(runtime_env, dict) and "PYTHONPATH" in runtime_env["env_vars"]


def test_ray_address_joins_that_cluster_without_new_node_settings(
    fake_ray: Install, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = fake_ray(0)
    probed: list[str] = []
    monkeypatch.setattr(engine, "_check_reachable", probed.append)
    monkeypatch.setenv(engine.RAY_ADDRESS_ENV, " 10.0.0.7:6379 ")
    with caplog.at_level(logging.INFO, logger="simulations.engine"):
        engine.start_ray({"num_cpus": 2, "num_gpus": 0, "log_to_driver": False})
    (args,) = fake.inits
    assert args["address"] == "10.0.0.7:6379" and args["log_to_driver"] is False
    assert not {"num_cpus", "num_gpus", "include_dashboard"} & set(args)
    assert "PYTHONPATH" in args["runtime_env"]["env_vars"]  # type: ignore[index]
    assert "joining the Ray cluster at 10.0.0.7:6379" in caplog.text
    assert "not num_cpus, num_gpus" in caplog.text
    assert probed == ["10.0.0.7:6379"]


def test_a_cluster_that_cannot_be_joined_is_named(
    fake_ray: Install, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fake_ray(10)
    monkeypatch.setattr(engine, "_check_reachable", lambda address: None)
    monkeypatch.setenv(engine.RAY_ADDRESS_ENV, "127.0.0.1:6379")
    with pytest.raises(engine.EngineStartError, match=r"join the Ray cluster at 127\.0\.0\.1"):
        engine.start_ray({"num_cpus": 2})
    assert len(fake.inits) == 3 and not fake.running


@pytest.mark.parametrize(
    ("address", "match"),
    [
        ("nonsense", "must be host:port"),
        ("host:99999", "must be host:port"),
        (":6379", "must be host:port"),
        ("127.0.0.1:{closed}", "nothing answers at 127.0.0.1"),
    ],
)
def test_an_address_nobody_answers_on_fails_at_once(
    fake_ray: Install, monkeypatch: pytest.MonkeyPatch, address: str, match: str
) -> None:
    # Ray itself would retry for minutes; the probe says so in one line, Ray untouched.
    fake = fake_ray(0)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv(engine.RAY_ADDRESS_ENV, address.format(closed=closed))
    with pytest.raises(engine.EngineStartError, match=match):
        engine.start_ray({"num_cpus": 2})
    assert fake.inits == []


def test_a_listening_address_passes_the_probe() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        engine._check_reachable(f"127.0.0.1:{s.getsockname()[1]}")
    engine._check_reachable("auto")  # Ray's own names are left to Ray
    engine._check_reachable("ray://head:10001")


def test_a_start_that_keeps_failing_is_a_clear_error(fake_ray: Install) -> None:
    fake = fake_ray(10)
    with pytest.raises(engine.EngineStartError, match="did not start in 3 attempts"):
        engine.start_ray({"num_cpus": 2})
    assert len(fake.inits) == 3 and not fake.running


def test_a_running_ray_is_reused(fake_ray: Install) -> None:
    fake = fake_ray(0)
    fake.running = True
    engine.start_ray({"num_cpus": 2})
    assert fake.inits == []


def test_attempts_must_be_positive(fake_ray: Install) -> None:
    fake_ray(0)
    with pytest.raises(ValueError):
        engine.start_ray({}, attempts=0)


def test_rays_accelerator_tip_is_not_shown(fake_ray: Install) -> None:
    fake_ray(0)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        engine.start_ray({"num_cpus": 2})
    assert [str(w.message) for w in shown] == []


SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
STUBBORN = [
    sys.executable,
    "-c",
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)",
]


def _gone(proc: subprocess.Popen[bytes]) -> bool:
    """Whether ``proc`` no longer runs (reaped by whoever: /proc has no live entry)."""
    try:
        with open(f"/proc/{proc.pid}/stat", "rb") as fh:
            stat = fh.read()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] == b"Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_processes_a_failed_start_left_are_stopped_and_others_kept(
    fake_ray: Install, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fake_ray(10)
    bystander = subprocess.Popen(SLEEPER)  # started before: not the failed start's
    spawned: list[subprocess.Popen[bytes]] = []

    def init(**kwargs: object) -> None:  # a half-started node: a child, then the timeout
        spawned.append(subprocess.Popen(SLEEPER))
        FakeRay.init(fake, **kwargs)

    monkeypatch.setattr("ray.init", init)
    try:
        with pytest.raises(engine.EngineStartError):
            engine.start_ray({"num_cpus": 2}, attempts=2)
        assert len(spawned) == 2 and all(_gone(p) for p in spawned)
        assert bystander.pid in engine.child_pids() and bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
        for proc in spawned:
            proc.wait(timeout=10)  # already reaped: returns at once


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period() -> None:
    proc = subprocess.Popen(STUBBORN, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        assert proc.pid in engine.child_pids()
        engine.stop_processes([proc.pid], grace_s=0.2)
        assert _gone(proc) and proc.pid not in engine.child_pids()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
