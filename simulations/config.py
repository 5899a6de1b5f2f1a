"""An experiment's configuration, read once: defaults < TOML file < ``--set`` flags.

A config file is flat TOML with the keys of :class:`SimulationConfig` (``-`` for ``_``),
a list of arms, and optional ``[arm.NAME]`` tables that override a preset arm or define a
new one (keys of :class:`~simulations.baselines.ArmConfig`)::

    name = "default"
    num-clients = 20
    clients-per-round = 10
    partitioning = "dirichlet"
    links = "mixed"
    arms = ["fedavg-fp32", "int8", "adaptive"]

    [arm.adaptive]
    budget-fraction = 0.02

Flags use the same names: ``--set num-rounds=5``, ``--set arms=fedavg-fp32,adaptive``,
``--set arm.adaptive.down-budget=3000``. Values are read as TOML (``5``, ``0.5``,
``true``, ``"text"``), and as plain text when they are not valid TOML.
"""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from coordinator.budget import PolicyKind
from fedsqueeze.errors import ConfigError
from fedsqueeze.runconfig import (
    Aggregation,
    Partitioning,
    RunSettings,
    StrategyName,
    StudentToTeacher,
)
from fedsqueeze.tasks import get_task
from fedsqueeze.tasks.base import Optimizer
from simulations.baselines import ARM_PRESETS, DEFAULT_ARMS, ArmConfig, ArmKind
from simulations.links import LinkMix, link_profile, parse_mix

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["SimulationConfig", "load_config"]


@dataclass(frozen=True)
class SimulationConfig:
    """One experiment: data, clients, links and the arms compared on them.

    Attributes
    ----------
    name
        Names the output folder (``simulations/outputs/NAME`` by default).
    task
        Built-in task name or ``module:attribute``.
    num_clients, clients_per_round
        Virtual clients, and how many are sampled each round (the same for every arm).
    num_rounds
        Rounds per arm.
    partitioning, alpha
        IID, or Dirichlet(α) label skew.
    seed
        Seeds the model, partitions, sampling, link assignment and local training.
    epochs, lr, batch_size
        Local training.
    links
        A named mix (``mixed``, ``mobile``, a profile name) or ``name:share,...``.
    deadline_s
        Round deadline on the simulated clock, in seconds (0: none). Stragglers past it
        are dropped.
    compute_s
        Local compute per client and round on the simulated clock, in seconds (0: what
        each client measured, which varies between runs; set it for repeatable times).
    realtime
        Make the fedsqueeze arms' data-plane transfers (fetch and push over gRPC) take
        real time on each client's link: every call waits one RTT and a token bucket
        holds the bytes to the link's bandwidth (:attr:`ShapingMode.REAL
        <fedsqueeze.transport.shaping.ShapingMode.REAL>`). Runs get as slow as the links
        say, or slower: clients share Ray's actors, so with fewer actors than sampled
        clients their waits add up (raise ``round-timeout-s`` for slow links, lower
        ``client-cpus`` for more actors); the simulated clock, the bytes
        and every reported figure stay the same, and ``results.csv``'s ``round_wall_s``
        shows the real time. Flower's own messages (plain Flower arms such as
        ``fedavg-fp32``, and every arm's control plane) are never slowed. Default: off,
        nothing sleeps.
    target_drop
        The target accuracy is the baseline arm's final accuracy minus this (0.01: one
        point).
    baseline
        The arm ratios are measured against.
    arms
        The arms, in the order they run.
    cpus
        CPUs Ray may use (0: all of this machine's).
    client_cpus
        CPUs per client actor (the number of actors is ``cpus / client_cpus``).
    client_gpus
        GPUs per client actor, a fraction (Ray's ``num_gpus``: ``0.25`` puts four actors
        on each GPU); 0 (the default) trains on the CPU. Above 0 the clients train on
        their GPU share (results close to the CPU's, not bit-identical), and the machine
        must have CUDA: a clear error otherwise.
    coordinator_device
        Where the coordinator decodes the updates and computes their differences,
        clipping and merge before the wrapped Flower strategy averages them: ``cpu``
        (the default), ``cuda`` or ``cuda:N``.
    threads
        torch threads in the coordinator (results depend on it; keep it fixed).
    round_timeout_s
        Wall-clock seconds a round may take before the run fails.
    prefix_points
        Points of the prefix curve per arm (0: no curve; each point is one evaluation
        of the final model).
    output_dir
        Where results go ('' : ``simulations/outputs/NAME``).
    """

    name: str = "default"
    task: str = "digits-cnn"
    num_clients: int = 20
    clients_per_round: int = 10
    num_rounds: int = 20
    partitioning: Partitioning = Partitioning.DIRICHLET
    alpha: float = 0.5
    seed: int = 0
    epochs: int = 2
    lr: float = 0.1
    batch_size: int = 32
    links: str = "mixed"
    deadline_s: float = 0.0
    compute_s: float = 0.0
    realtime: bool = False
    target_drop: float = 0.01
    baseline: str = "fedavg-fp32"
    arms: tuple[ArmConfig, ...] = field(
        default_factory=lambda: tuple(ARM_PRESETS[n] for n in DEFAULT_ARMS)
    )
    cpus: int = 0
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    coordinator_device: str = "cpu"
    threads: int = 1
    round_timeout_s: float = 300.0
    prefix_points: int = 12
    output_dir: str = ""

    def __post_init__(self) -> None:
        if self.num_clients < 1 or not 1 <= self.clients_per_round <= self.num_clients:
            raise ConfigError(
                f"clients-per-round must be in 1..num-clients ({self.num_clients}), "
                f"got {self.clients_per_round}"
            )
        if self.num_rounds < 1 or self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("num-rounds, epochs, batch-size and lr must be positive")
        if self.alpha <= 0 or min(self.deadline_s, self.compute_s, self.target_drop) < 0:
            raise ConfigError("alpha must be > 0; deadline-s, compute-s and target-drop >= 0")
        if not self.arms:
            raise ConfigError("a sweep needs at least one arm")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ConfigError(f"arm names must be unique: {names}")
        if self.cpus < 0 or self.client_cpus <= 0 or self.threads < 1:
            raise ConfigError("cpus must be >= 0, client-cpus > 0, threads >= 1")
        if self.client_cpus > self.total_cpus:
            # Ray would log "ActorPool is empty" and wait forever.
            raise ConfigError(
                f"client-cpus ({self.client_cpus}) exceeds the {self.total_cpus} CPUs "
                "available to the simulation: no client could ever run"
            )
        self._check_devices()
        if self.round_timeout_s <= 0 or self.prefix_points < 0:
            raise ConfigError("round-timeout-s must be > 0 and prefix-points >= 0")
        self.link_mix()
        for arm in self.arms:
            for name in arm.student_links:
                link_profile(name)
            get_task(self.arm_task(arm))
            self.run_settings(arm, "state")

    def _check_devices(self) -> None:
        """``client-gpus`` and ``coordinator-device`` name devices this machine has."""
        from fedsqueeze.tasks.training import check_device  # deferred: imports torch

        if not self.client_gpus >= 0:  # also rejects NaN
            raise ConfigError(f"client-gpus must be >= 0, got {self.client_gpus}")
        if self.client_gpus > 0:
            try:
                check_device("cuda", "client-gpus")
            except ConfigError:
                import torch

                raise ConfigError(
                    f"client-gpus = {self.client_gpus} trains the clients on GPUs, and this "
                    f"machine has no CUDA device (torch {torch.__version__}); set "
                    "client-gpus = 0"
                ) from None
        check_device(self.coordinator_device, "coordinator-device")

    @property
    def total_cpus(self) -> int:
        """CPUs the simulation may use."""
        return self.cpus or os.cpu_count() or 1

    def link_mix(self) -> LinkMix:
        """The parsed link mix."""
        return parse_mix(self.links)

    def arm(self, name: str) -> ArmConfig:
        """The arm called ``name``."""
        for a in self.arms:
            if a.name == name:
                return a
        raise ConfigError(f"no arm {name!r}; arms: {', '.join(a.name for a in self.arms)}")

    def arm_task(self, arm: ArmConfig) -> str:
        """The task ``arm`` trains: its own, or the sweep's."""
        return arm.task or self.task

    def arm_frozen(self, arm: ArmConfig) -> tuple[str, ...]:
        """The frozen patterns of ``arm``'s run: its ``freeze`` (``auto``: its task's own)
        with those of its codec specs."""
        return self.run_settings(arm, "").frozen(get_task(self.arm_task(arm)).frozen)

    def out_dir(self) -> Path:
        """The output folder."""
        return Path(self.output_dir or Path("simulations") / "outputs" / self.name)

    def run_settings(self, arm: ArmConfig, state_dir: str) -> RunSettings:
        """The coordinator and edge settings of one arm.

        Sampling happens in the simulation's grid, so the wrapped strategy takes every
        node it is offered (``fraction-train = 1``, minimum 1). An arm with a
        ``first-delivery`` spec does not let edges rebuild the initial model.
        """
        return RunSettings(
            task=self.arm_task(arm),
            seed=self.seed,
            num_rounds=self.num_rounds,
            partitioning=self.partitioning,
            alpha=self.alpha,
            fraction_train=1.0,
            min_train_nodes=1,
            min_available_nodes=1,
            epochs=self.epochs,
            lr=arm.lr or self.lr,
            optimizer=arm.optimizer,
            batch_size=self.batch_size,
            down_spec=arm.down_spec,
            up_spec=arm.up_spec,
            down_budget=0,
            up_budget=0,
            inline_bytes=arm.inline_bytes,
            init_from_seed=not arm.first_delivery,
            state_dir=state_dir,
            keep_versions=max(32, 4 * self.clients_per_round),
            round_timeout=self.round_timeout_s,
            # An experiment records rounds that aggregate nothing (every sampled client
            # dropped at a deadline, skipped by a budget) as results, not as a failure.
            max_failed_rounds=self.num_rounds,
            freeze=arm.freeze,
            student_refresh_every=arm.student_refresh_every if arm.student_links else 0,
            student_lr=arm.student_lr,
            student_from_teacher=arm.student_from_teacher,
            student_to_teacher_epochs=arm.student_to_teacher_epochs,
            student_to_teacher=arm.student_to_teacher,
            student_down_budget=arm.student_down_budget if arm.student_links else 0,
            student_up_budget=arm.student_up_budget if arm.student_links else 0,
            fusion_warmup=arm.fusion_warmup,
            distill_epochs=arm.distill_epochs,
            aggregation=arm.aggregation,
            strategy=arm.strategy,
            server_lr=arm.server_lr,
            server_momentum=arm.server_momentum,
            # every arm's clients hold the same data: none of the proxy rows any
            # distilling arm's coordinator holds
            hold_out_proxy=self.distils,
            coordinator_device=self.coordinator_device,
        )

    @property
    def distils(self) -> bool:
        """Whether an arm distils (a student track or FedDF), so holds a proxy set out."""
        return any(
            (a.student_links and a.student_refresh_every) or a.aggregation is Aggregation.FEDDF
            for a in self.arms
        )


def load_config(path: str | Path | None, sets: Sequence[str] = ()) -> SimulationConfig:
    """Read a config file (or the defaults) and apply ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    top: dict[str, Any] = {k: v for k, v in raw.items() if k != "arm"}
    arm_tables: dict[str, dict[str, Any]] = {
        name: dict(table) for name, table in dict(raw.get("arm", {})).items()
    }
    # The file's tables for arms a --set arms=... leaves out are not typos: a run of some
    # of a config's arms (``--set arms=fedavg-adapters,adaptive-ffa``) ignores them.
    file_tables = set(arm_tables)
    set_tables: set[str] = set()  # arm tables a --set names
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = key.strip(), _value(text.strip())
        if key.startswith("arm."):
            _, name, arm_key = [*key.split(".", 2), "", ""][:3]
            if not name or not arm_key:
                raise ConfigError(f"--set {key}: expected arm.NAME.KEY")
            arm_tables.setdefault(name, {})[arm_key] = value
            set_tables.add(name)
        else:
            top[key] = value
    arms_from_set = any(item.partition("=")[0].strip() == "arms" for item in sets)
    arm_names = top.pop("arms", None)
    if isinstance(arm_names, str):
        arm_names = [n.strip() for n in arm_names.split(",") if n.strip()]
    if arm_names is None:
        arm_names = list(DEFAULT_ARMS)
    if not isinstance(arm_names, list) or not all(isinstance(n, str) for n in arm_names):
        raise ConfigError("arms must be a list of arm names")
    extra = top.pop("extra-arms", [])
    if isinstance(extra, str):
        extra = [n.strip() for n in extra.split(",") if n.strip()]
    if not isinstance(extra, list) or not all(isinstance(n, str) for n in extra):
        raise ConfigError("extra-arms must be a list of arm names")
    _check_arm_names([*arm_names, *extra], arm_tables)
    used: set[str] = set()
    arms = tuple(_arm(name, arm_tables, used) for name in arm_names)
    unused = set(arm_tables) - used - set(extra)
    if arms_from_set:
        unused -= file_tables - set_tables
    if unused:
        raise ConfigError(f"[arm.{sorted(unused)[0]}] is not in arms = {arm_names}")
    kwargs = _kwargs(SimulationConfig, top, "config")
    return SimulationConfig(**kwargs, arms=arms)


def _check_arm_names(names: Sequence[str], tables: Mapping[str, Any]) -> None:
    """Every listed arm is a preset or defined by an ``[arm.NAME]`` table: a typo in
    ``arms`` must not run an arm built from defaults."""
    for name in names:
        if name not in ARM_PRESETS and name not in tables:
            raise ConfigError(
                f"unknown arm {name!r}; known arms: {', '.join(ARM_PRESETS)} "
                f"(or define it in an [arm.{name}] table)"
            )


def _arm(
    name: str, tables: Mapping[str, Mapping[str, Any]], used: set[str], chain: tuple[str, ...] = ()
) -> ArmConfig:
    """Arm ``name`` from its table: its preset (or the defaults) with the table's keys, or,
    when the table names a ``base`` arm, that arm (a table of this file or a preset) with
    them. Adds every table it reads to ``used``."""
    if name in chain:
        raise ConfigError(f"arm.{name}: base arms form a cycle: {' -> '.join((*chain, name))}")
    used.add(name)
    table = dict(tables.get(name, {}))
    base_name = table.pop("base", None)
    if base_name is None:
        base = ARM_PRESETS.get(name, ArmConfig(name))
    else:
        if not isinstance(base_name, str) or (
            base_name not in tables and base_name not in ARM_PRESETS
        ):
            raise ConfigError(
                f"arm.{name}.base = {base_name!r}: not an arm of this config or a preset"
            )
        base = _arm(base_name, tables, used, (*chain, name))
    kwargs = _kwargs(ArmConfig, table, f"arm.{name}")
    kwargs.pop("name", None)
    return replace(base, name=name, **kwargs)


def _value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _kwargs(cls: type, table: Mapping[str, Any], where: str) -> dict[str, Any]:
    known = {f.name.replace("_", "-"): f for f in fields(cls) if f.name != "arms"}
    out: dict[str, Any] = {}
    for key, value in table.items():
        f = known.get(key)
        if f is None:
            raise ConfigError(
                f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(known))}"
            )
        out[f.name] = _coerce(f"{where}.{key}", value, str(f.type))
    return out


_ENUMS: dict[str, type[enum.Enum]] = {
    "Partitioning": Partitioning,
    "PolicyKind": PolicyKind,
    "ArmKind": ArmKind,
    "Aggregation": Aggregation,
    "StudentToTeacher": StudentToTeacher,
    "StrategyName": StrategyName,
    "Optimizer": Optimizer,
}


def _coerce(key: str, value: Any, kind: str) -> Any:
    try:
        if kind in _ENUMS:
            return _ENUMS[kind](str(value).lower())
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if kind.startswith("tuple"):
            items = value.split(";") if isinstance(value, str) else list(value)
            return tuple(str(v).strip() for v in items)
        if not isinstance(value, (str, int, float)):
            raise ValueError(value)
        return str(value)
    except ValueError:
        if kind in _ENUMS:
            expected = "one of " + ", ".join(str(m.value) for m in _ENUMS[kind])
        else:
            expected = "true or false" if kind == "bool" else kind
        raise ConfigError(f"{key} = {value!r}: expected {expected}") from None
