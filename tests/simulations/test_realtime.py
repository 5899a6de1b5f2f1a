"""``realtime``: the fedsqueeze data plane really waits for each client's link, when asked.

No simulation starts here: the sleeps go to a fake clock, and the data plane is a
plaintext loopback server, so nothing depends on how fast this machine is.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from edge.dataplane import Fetched, GrpcConnector, Pushed
from edge.mod import make_mod
from fedsqueeze.codec import CodecSpec, EncodedModel, encode_state, state_digest
from fedsqueeze.control import CONTROL_KEY, RECEIPT_KEY, RoundInstruction, TrainReceipt
from fedsqueeze.errors import ConfigError
from fedsqueeze.transport import (
    Direction,
    InMemoryModelSource,
    LinkDirection,
    LinkProfile,
    ServerConfig,
    ShapingMode,
    TokenTable,
    TransferServer,
    UpdateStore,
)
from simulations.client import make_sim_client_app, sim_connector, sim_link_shaper
from simulations.config import SimulationConfig, load_config
from simulations.grid import SimulationError
from simulations.links import assign_links, link_profile
from tests.transport.conftest import FakeTime

pytestmark = pytest.mark.timeout(120)

#: 8 Mbit/s down (1 MB/s), 0.8 Mbit/s up (100 kB/s), 50 ms RTT.
LINK = LinkProfile(8e6, 8e5, 0.05)
#: LinkShaper's default token bucket: 10 ms of bandwidth may go at once.
BURST_S = 0.01


def _expected_wait(link: LinkProfile, calls: int, down: int, up: int) -> float:
    """RTT per call, and each direction's bytes past the bucket's burst at its rate."""
    total = calls * link.rtt_s
    for direction, nbytes in ((LinkDirection.DOWN, down), (LinkDirection.UP, up)):
        rate = link.bytes_per_s(direction)
        total += max(0.0, nbytes - max(rate * BURST_S, 1.0)) / rate
    return total


# ---------------------------------------------------------------------- config
def test_realtime_is_off_by_default() -> None:
    assert SimulationConfig().realtime is False
    assert load_config(None).realtime is False


def test_realtime_can_be_set_from_the_file_and_flags(tmp_path: Path) -> None:
    f = tmp_path / "rt.toml"
    f.write_text('name = "rt"\nrealtime = true\n')
    assert load_config(f).realtime is True
    assert load_config(f, ["realtime=false"]).realtime is False
    assert load_config(None, ["realtime=true"]).realtime is True


@pytest.mark.parametrize("value", ["yes", "1", "0", '"true"', "on"])
def test_realtime_must_be_a_bool(value: str) -> None:
    with pytest.raises(ConfigError, match=r"realtime = .*expected true or false"):
        load_config(None, [f"realtime={value}"])


def test_realtime_in_a_file_must_be_a_bool(tmp_path: Path) -> None:
    f = tmp_path / "rt.toml"
    f.write_text('realtime = "yes"\n')
    with pytest.raises(ConfigError, match="realtime"):
        load_config(f)


# ---------------------------------------------------------------------- the shaper
def test_realtime_shaper_sleeps_for_the_bytes_and_round_trips() -> None:
    fake = FakeTime()
    shaper = sim_link_shaper(LINK, True, monotonic=fake.monotonic, sleep=fake.sleep)
    assert shaper.mode is ShapingMode.REAL
    for _ in range(2):  # Fetch and PushUpdate: one round trip each
        shaper.on_call()
    shaper.on_message(Direction.RECEIVED, 500_000)  # down: 0.5 s at 1 MB/s
    shaper.on_message(Direction.RECEIVED, 500_000)
    shaper.on_message(Direction.SENT, 50_000)  # up: 0.5 s at 100 kB/s
    expected = 2 * 0.05 + (1.0 - BURST_S) + (0.5 - BURST_S)
    assert sum(fake.slept) == pytest.approx(expected)
    assert expected == pytest.approx(_expected_wait(LINK, 2, 1_000_000, 50_000))
    assert shaper.waited_s == pytest.approx(expected)
    # the simulated clock is the same as without realtime (no burst there)
    assert shaper.clock.elapsed_s == pytest.approx(2 * 0.05 + 1.0 + 0.5)


def test_shaper_without_realtime_never_sleeps() -> None:
    fake = FakeTime()
    shaper = sim_link_shaper(LINK, False, monotonic=fake.monotonic, sleep=fake.sleep)
    assert shaper.mode is ShapingMode.SIMULATED
    for _ in range(2):
        shaper.on_call()
    shaper.on_message(Direction.RECEIVED, 1_000_000)
    shaper.on_message(Direction.SENT, 50_000)
    assert fake.slept == []
    assert shaper.waited_s == 0.0
    assert shaper.clock.elapsed_s == pytest.approx(2 * 0.05 + 1.0 + 0.5)


def test_each_client_gets_its_partitions_link() -> None:
    links = (LINK, LinkProfile.from_mbit(0.2, 0.1, 600))
    assert sim_connector((), True, 0) is None  # no links: the mod's default connector
    for realtime, mode in ((True, ShapingMode.REAL), (False, ShapingMode.SIMULATED)):
        connector = sim_connector(links, realtime, 1)
        assert connector is not None and connector.link is not None
        shaper = connector.link()
        assert shaper.profile == links[1] and shaper.mode is mode
    for bad in (None, 2, -1, "0"):
        with pytest.raises(ValueError, match="partition id"):
            sim_connector(links, True, bad)


# ---------------------------------------------------------------------- the data plane
_GEN = torch.Generator().manual_seed(0)
#: About 260 kB of float32: random, so that no entropy coder makes it small.
STATE = {"w": torch.randn(256, 256, generator=_GEN), "b": torch.randn(256, generator=_GEN)}
NOISE = {k: 0.01 * torch.randn(v.shape, generator=_GEN) for k, v in STATE.items()}


@pytest.fixture
def plane() -> Iterator[tuple[TransferServer, str, str]]:
    """A plaintext loopback data plane holding STATE; yields it, its digest and a token."""
    source = InMemoryModelSource(keep=2)
    digest = source.publish(STATE)
    table, tokens = TokenTable.generate(["7"])
    server = TransferServer(
        source, UpdateStore(), table, config=ServerConfig(host="127.0.0.1"), plaintext=True
    )
    server.start()
    try:
        yield server, digest, tokens["7"]
    finally:
        server.stop(grace=0)


def _instruction(server: TransferServer, digest: str, token: str) -> RoundInstruction:
    return RoundInstruction(
        1, server.address, digest, "lossless", "lossless", "digits-cnn", 0, "", token=token
    )


def _connector(realtime: bool, fake: FakeTime, made: list[Any]) -> GrpcConnector:
    def link() -> Any:
        shaper = sim_link_shaper(LINK, realtime, monotonic=fake.monotonic, sleep=fake.sleep)
        made.append(shaper)
        return shaper

    return GrpcConnector(link=link)


@pytest.mark.parametrize("realtime", [True, False])
def test_data_plane_transfers_wait_only_with_realtime(
    plane: tuple[TransferServer, str, str], realtime: bool
) -> None:
    server, digest, token = plane
    fake = FakeTime()
    shapers: list[Any] = []
    connector = _connector(realtime, fake, shapers)
    instruction = _instruction(server, digest, token)

    fetched = connector.fetch(instruction, "7", None, None)
    assert fetched.digest == digest
    assert fetched.bytes_down > 100_000  # the model came down the link
    fetch_calls = shapers[0].clock.round_trips
    fetch_wait = _expected_wait(LINK, fetch_calls, fetched.bytes_down, fetched.bytes_up)
    if realtime:
        assert sum(fake.slept) == pytest.approx(fetch_wait)
        assert fetched.link_wait_s == pytest.approx(fetch_wait)
    else:
        assert fake.slept == [] and fetched.link_wait_s == 0.0

    trained = {k: v + NOISE[k] for k, v in fetched.state.items()}
    encoded = encode_state(trained, CodecSpec(), fetched.state, base_digest=bytes.fromhex(digest))
    pushed = connector.push(instruction, "7", "1-update", digest, encoded)
    assert pushed.bytes_up > 100_000  # the update went up the link
    push_calls = shapers[1].clock.round_trips
    push_wait = _expected_wait(LINK, push_calls, pushed.bytes_down, pushed.bytes_up)
    if realtime:
        assert sum(fake.slept) == pytest.approx(fetch_wait + push_wait)
        assert pushed.link_wait_s == pytest.approx(push_wait)
        assert push_wait > 1.0  # over 100 kB at 100 kB/s: the wait follows the link
    else:
        assert fake.slept == [] and pushed.link_wait_s == 0.0

    # Whether or not it waited, the simulated link saw the same calls and bytes.
    assert (fetch_calls, push_calls) == (1, 1)
    assert [s.clock.bytes_moved(LinkDirection.DOWN) for s in shapers] == [
        fetched.bytes_down,
        pushed.bytes_down,
    ]
    assert [s.clock.bytes_moved(LinkDirection.UP) for s in shapers] == [
        fetched.bytes_up,
        pushed.bytes_up,
    ]


# ---------------------------------------------------------------------- the receipt
class WaitingPlane:
    """A data plane whose emulated link claims to have waited a long time."""

    def fetch(
        self, instruction: Any, edge_id: str, held_digest: Any, held: Any, *, parts: Any = None
    ) -> Fetched:
        return Fetched({k: v.clone() for k, v in STATE.items()}, DIGEST, 1000, 100, 1e6)

    def push(
        self, instruction: Any, edge_id: str, update_id: str, base: str, encoded: EncodedModel
    ) -> Pushed:
        return Pushed(50, 500, 1e6)


DIGEST = state_digest(STATE).hex()


def _train(msg: Message, context: Context) -> Message:
    state = msg.content.array_records["arrays"].to_torch_state_dict()
    metrics = MetricRecord({"num-examples": 4, "train-loss": 0.5, "compute-seconds": 0.25})
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": metrics})
    return Message(content, reply_to=msg)


@pytest.mark.usefixtures("flower_identity")
def test_link_waits_are_not_counted_as_local_compute() -> None:
    instruction = RoundInstruction(
        1, "127.0.0.1:1", DIGEST, "lossless", "lossless", "digits-cnn", 0, ""
    )
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    content[CONTROL_KEY] = instruction.to_record()
    msg = Message(content, dst_node_id=7, message_type="train")
    context = Context(
        run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )
    reply = make_mod(connector=WaitingPlane(), initial_model=None)(msg, context, _train)
    receipt = TrainReceipt.from_records(reply.content.config_records[RECEIPT_KEY])
    # The simulated clock counts the link from the bytes: the real waits are left out.
    assert receipt.fetch_seconds == 0.0 and receipt.push_seconds == 0.0
    assert receipt.train_seconds == pytest.approx(0.25)
    assert (receipt.bytes_down, receipt.bytes_up) == (1050, 600)


# ---------------------------------------------------------------------- the runner
def test_the_runner_hands_realtime_and_the_links_to_the_clients(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import simulations.engine
    import simulations.runner

    seen: dict[str, Any] = {}

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return make_sim_client_app(*args, **kwargs)

    def no_simulation(**kwargs: Any) -> None:  # nothing starts: no Flower, no Ray
        seen["started"] = True

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # run_sweep sets it for Ray's workers
    monkeypatch.setattr(simulations.runner, "make_sim_client_app", spy)
    monkeypatch.setattr(simulations.engine, "run_simulation", no_simulation)
    config = load_config(None, ["num-clients=4", "clients-per-round=2", "realtime=true"])
    with pytest.raises(SimulationError, match="ended early"):
        simulations.runner.run_sweep(config, out_dir=tmp_path, plots=False)
    names = assign_links(config.link_mix(), config.num_clients, config.seed)
    assert seen["started"] and seen["realtime"] is True
    assert tuple(seen["links"]) == tuple(link_profile(n) for n in names)
