"""The control messages inside Flower messages: round trips, hostile input, and their size."""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace

import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from coordinator.tokens import DerivedTokens
from fedsqueeze.codec.spec_text import format_spec, parse_spec
from fedsqueeze.control import (
    CONTROL_KEY,
    RECEIPT_KEY,
    WIRE_KEY,
    ModelTrack,
    RoundInstruction,
    TrainReceipt,
)
from fedsqueeze.errors import ConfigError
from fedsqueeze.wire import control_pb2 as pb

DIGEST = hashlib.sha256(b"model").hexdigest()
INIT = hashlib.sha256(b"init").hexdigest()
TOKEN = DerivedTokens(b"s" * 32).token_for("123456789012345678")
DOWN = format_spec(parse_spec("prune=l1:0.9,quant=2:kmeans,targets=*,min-ndim=1"))
UP = format_spec(parse_spec("topk=0.05,quant=2:kmeans,targets=*,min-ndim=1"))


def _instruction(**changes: object) -> RoundInstruction:
    base = RoundInstruction(
        server_round=17,
        address="10.0.0.5:50061",
        target=DIGEST,
        down_spec=DOWN,
        up_spec=UP,
        task="digits-cnn",
        init_seed=0,
        init_digest=INIT,
        down_budget=4200,
        up_budget=3000,
        token=TOKEN,
        tls=True,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def _receipt(**changes: object) -> TrainReceipt:
    base = TrainReceipt(
        update_id="123456789012345678-17-0a1b2c3d",
        held=DIGEST,
        num_examples=90,
        loss=0.25,
        bytes_down=3455,
        bytes_up=2235,
        train_seconds=0.5,
        fetch_seconds=0.125,
        push_seconds=0.0625,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def _record_bytes(key: str, record: ConfigRecord) -> int:
    return int(recorddict_to_proto(RecordDict({key: record})).ByteSize())


def test_instruction_round_trips() -> None:
    instruction = _instruction()
    assert RoundInstruction.from_record(instruction.to_record()) == instruction
    no_init = _instruction(task="", init_seed=-1, init_digest="", tls=False, down_budget=0)
    assert RoundInstruction.from_record(no_init.to_record()) == no_init


def test_the_track_round_trips_and_the_global_track_costs_nothing() -> None:
    student = _instruction(track=ModelTrack.STUDENT)
    assert RoundInstruction.from_record(student.to_record()).track is ModelTrack.STUDENT
    teacher = _instruction()
    assert teacher.track is ModelTrack.GLOBAL
    assert _record_bytes(CONTROL_KEY, student.to_record()) == 2 + _record_bytes(
        CONTROL_KEY, teacher.to_record()
    )


def test_specs_travel_in_compact_form_and_come_back_canonical() -> None:
    sent = _instruction(down_spec="int8", up_spec="topk10-int4")
    back = RoundInstruction.from_record(sent.to_record())
    assert parse_spec(back.down_spec) == parse_spec("int8")
    assert parse_spec(back.up_spec) == parse_spec("topk10-int4")
    assert back.down_spec == format_spec(parse_spec("int8"))


def test_instruction_without_init_digest_drops_task_and_seed() -> None:
    # A task or seed without the digest to check them against is of no use to the edge.
    back = RoundInstruction.from_record(_instruction(init_digest="").to_record())
    assert (back.task, back.init_seed, back.init_digest) == ("", -1, "")


def test_receipt_carries_examples_loss_and_seconds_instead_of_the_apps_metrics() -> None:
    receipt = _receipt()
    app = MetricRecord(
        {"num-examples": 90, "train-loss": 0.25, "compute-seconds": 0.5, "accuracy": 0.75}
    )
    ids, metrics = receipt.to_records(app)
    assert dict(metrics) == {"accuracy": 0.75}  # what the receipt does not carry
    assert TrainReceipt.from_records(ids) == receipt
    assert TrainReceipt.from_records(ids, metrics) == receipt
    # The coordinator gives Flower's strategies everything the app reported.
    rebuilt = receipt.strategy_metrics(metrics)
    assert dict(rebuilt) == {
        "accuracy": 0.75,
        "num-examples": 90,
        "train-loss": 0.25,
        "compute-seconds": receipt.train_seconds,
    }
    ids, metrics = receipt.to_records()  # an app that reported nothing
    assert dict(metrics) == {}
    assert TrainReceipt.from_records(ids, metrics) == receipt


def test_a_receipt_without_examples_reads_them_from_the_metrics() -> None:
    # An edge from before examples and loss moved into the receipt sent them as metrics.
    ids, _ = _receipt().to_records()
    wire = ids[WIRE_KEY]
    assert isinstance(wire, bytes)
    message = pb.TrainReceipt.FromString(wire)
    message.ClearField("num_examples")
    message.ClearField("loss")
    old = ConfigRecord({WIRE_KEY: message.SerializeToString()})
    back = TrainReceipt.from_records(old, MetricRecord({"num-examples": 7, "loss": 1.5}))
    assert (back.num_examples, back.loss) == (7, 1.5)
    assert math.isnan(TrainReceipt.from_records(old).loss)


def test_a_receipt_without_a_finite_loss_sends_none() -> None:
    ids, _ = _receipt(loss=math.nan).to_records()
    wire = ids[WIRE_KEY]
    assert isinstance(wire, bytes)
    assert not pb.TrainReceipt.FromString(wire).HasField("loss")
    assert math.isnan(TrainReceipt.from_records(ids).loss)
    assert "train-loss" not in _receipt(loss=math.nan).strategy_metrics()


def test_control_messages_are_small() -> None:
    """Every client pays these in every round: keep them from growing back.

    The ConfigRecord of named fields with hex digests this replaced cost 442 bytes for
    the instruction and 379 (with the app's metrics) for the receipt, as RecordDicts.
    """
    first_contact = _record_bytes(CONTROL_KEY, _instruction().to_record())
    later = _record_bytes(CONTROL_KEY, _instruction(task="", init_digest="").to_record())
    ids, _ = _receipt().to_records()
    receipt = _record_bytes(RECEIPT_KEY, ids)
    assert first_contact <= 195, first_contact  # 187 when written
    assert later <= 145, later  # 137 (the specs as text would add about 70)
    assert receipt <= 130, receipt  # 121


@pytest.mark.parametrize(
    "record",
    [
        ConfigRecord({}),
        ConfigRecord({WIRE_KEY: "not bytes"}),
        ConfigRecord({WIRE_KEY: b"\xff\xff\xff"}),
        ConfigRecord({"server_round": 1, "address": "x"}),  # the old named-field form
    ],
)
def test_a_bad_instruction_is_a_config_error(record: ConfigRecord) -> None:
    with pytest.raises(ConfigError):
        RoundInstruction.from_record(record)


def test_an_instruction_needs_an_address_and_a_full_digest() -> None:
    from fedsqueeze.wire import control_pb2 as pb

    good = pb.RoundInstruction()
    good.ParseFromString(_instruction().to_record()[WIRE_KEY])  # type: ignore[arg-type]
    for field, value in (("address", ""), ("target_digest", b"\x01" * 31)):
        bad = pb.RoundInstruction()
        bad.CopyFrom(good)
        setattr(bad, field, value)
        with pytest.raises(ConfigError):
            RoundInstruction.from_record(ConfigRecord({WIRE_KEY: bad.SerializeToString()}))


@pytest.mark.parametrize(
    "instruction",
    [
        _instruction(target="zz"),
        _instruction(target=DIGEST[:-2]),
        _instruction(init_digest="abc"),
        _instruction(down_budget=-1),
        _instruction(down_spec="quant=5"),
        _instruction(up_spec="no such spec"),
    ],
)
def test_an_invalid_instruction_is_refused_before_it_is_sent(instruction: RoundInstruction) -> None:
    with pytest.raises(ConfigError):
        instruction.to_record()


def test_a_bad_receipt_is_a_config_error() -> None:
    ids, metrics = _receipt().to_records()
    with pytest.raises(ConfigError):
        TrainReceipt.from_records(ConfigRecord({WIRE_KEY: b"\x0a\xff"}), metrics)
    with pytest.raises(ConfigError):
        TrainReceipt.from_records(ids, MetricRecord({"num-examples": -3}))
    with pytest.raises(ConfigError):
        _receipt(held="beef").to_records()
    with pytest.raises(ConfigError):
        _receipt(train_seconds=math.inf).to_records()
    empty_ids, _ = _receipt(update_id="").to_records()
    with pytest.raises(ConfigError):
        TrainReceipt.from_records(empty_ids, metrics)


def test_a_receipt_carries_what_the_edge_decoded_of_a_prefix() -> None:
    receipt = _receipt(decoded_bytes=2048, decoded_levels=(0, 2, 1))
    ids, metrics = receipt.to_records()
    assert TrainReceipt.from_records(ids, metrics) == receipt
    # levels mean nothing without a prefix: a whole model's receipt drops them
    whole = _receipt(decoded_bytes=0, decoded_levels=(1, 1))
    ids, metrics = whole.to_records()
    assert TrainReceipt.from_records(ids, metrics).decoded_levels == ()
    with pytest.raises(ConfigError, match="levels"):
        _receipt(decoded_bytes=1, decoded_levels=(256,)).to_records()
    with pytest.raises(ConfigError, match="negative"):
        _receipt(decoded_bytes=-1).to_records()


def test_inline_payloads_round_trip_and_cost_only_their_bytes() -> None:
    plain = _instruction()
    inline = _instruction(payload=b"\x01" * 1900, payload_digest=INIT, inline_limit=4096)
    assert RoundInstruction.from_record(inline.to_record()) == inline
    extra = len(inline.to_record()[WIRE_KEY]) - len(plain.to_record()[WIRE_KEY])  # type: ignore[arg-type]
    # payload, its digest, the limit (field 16: a two-byte tag)
    assert extra == (1900 + 3) + (32 + 2) + (2 + 2)
    receipt = _receipt(update_id="", update=b"\x02" * 1700)
    ids, metrics = receipt.to_records()
    assert TrainReceipt.from_records(ids, metrics) == receipt


def test_inline_payloads_must_be_whole() -> None:
    with pytest.raises(ConfigError, match="digest"):
        _instruction(payload=b"\x01").to_record()
    with pytest.raises(ConfigError, match="digest"):
        _instruction(payload_digest=INIT).to_record()
    with pytest.raises(ConfigError, match="negative"):
        _instruction(inline_limit=-1).to_record()
    with pytest.raises(ConfigError, match="not both"):
        _receipt(update=b"\x02").to_records()
