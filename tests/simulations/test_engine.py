"""A Ray start that times out is retried, then a clear error: never a hang."""

from __future__ import annotations

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
        return fake

    return install


def test_a_start_that_times_out_is_retried(fake_ray: Install) -> None:
    fake = fake_ray(2)
    engine.start_ray({"num_cpus": 2})
    assert fake.running and len(fake.inits) == 3 and fake.shutdowns == 2
    assert fake.inits[-1]["num_cpus"] == 2 and fake.inits[-1]["include_dashboard"] is False
    runtime_env = fake.inits[-1]["runtime_env"]
    assert isinstance(runtime_env, dict) and "PYTHONPATH" in runtime_env["env_vars"]


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
