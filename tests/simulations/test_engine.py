"""A Ray start that times out is retried, then a clear error: never a hang."""

from __future__ import annotations

import pytest

from simulations import engine


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
        if len(self.inits) <= self.failures:
            raise Exception("The current node timed out during startup.")
        self.running = True

    def shutdown(self) -> None:
        self.shutdowns += 1


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch):
    import ray

    def install(failures: int) -> FakeRay:
        fake = FakeRay(failures)
        for name in ("is_initialized", "init", "shutdown"):
            monkeypatch.setattr(ray, name, getattr(fake, name))
        monkeypatch.setattr(engine.time, "sleep", lambda s: None)
        return fake

    return install


def test_a_start_that_times_out_is_retried(fake_ray) -> None:
    fake = fake_ray(failures=2)
    engine.start_ray({"num_cpus": 2})
    assert fake.running and len(fake.inits) == 3 and fake.shutdowns == 2
    assert fake.inits[-1]["num_cpus"] == 2 and fake.inits[-1]["include_dashboard"] is False
    assert "PYTHONPATH" in fake.inits[-1]["runtime_env"]["env_vars"]  # type: ignore[index]


def test_a_start_that_keeps_failing_is_a_clear_error(fake_ray) -> None:
    fake = fake_ray(failures=10)
    with pytest.raises(engine.EngineStartError, match="did not start in 3 attempts"):
        engine.start_ray({"num_cpus": 2})
    assert len(fake.inits) == 3 and not fake.running


def test_a_running_ray_is_reused(fake_ray) -> None:
    fake = fake_ray(failures=0)
    fake.running = True
    engine.start_ray({"num_cpus": 2})
    assert fake.inits == []


def test_attempts_must_be_positive(fake_ray) -> None:
    fake_ray(failures=0)
    with pytest.raises(ValueError):
        engine.start_ray({}, attempts=0)
