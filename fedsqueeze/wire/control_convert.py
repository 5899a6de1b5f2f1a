"""Conversions between the control messages (``control.proto``) and their Python types.

The control plane rides inside Flower messages as one ``bytes`` value each way (see
``proto/fedsqueeze/v1/control.proto``); this module serializes and parses those bytes.
Parsing treats its input as hostile: anything that does not describe a valid message
raises :class:`~fedsqueeze.errors.ConfigError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from google.protobuf.message import DecodeError

from fedsqueeze.codec import CodecSpec
from fedsqueeze.codec.spec_text import format_spec, parse_spec
from fedsqueeze.control import ModelTrack, RoundInstruction, TrainReceipt
from fedsqueeze.errors import CodecError, ConfigError
from fedsqueeze.wire import control_pb2 as pb
from fedsqueeze.wire.types import DIGEST_BYTES, check_digest

__all__ = [
    "instruction_from_bytes",
    "instruction_to_bytes",
    "receipt_from_bytes",
    "receipt_to_bytes",
]


def _digest_to_wire(hex_digest: str, what: str) -> bytes:
    try:
        return check_digest(bytes.fromhex(hex_digest), what)
    except ValueError as exc:
        raise ConfigError(f"{what} is not a {DIGEST_BYTES}-byte hex digest: {exc}") from exc


def _digest_from_wire(raw: bytes, what: str, *, optional: bool = False) -> str:
    if not raw and optional:
        return ""
    try:
        return check_digest(raw, what).hex()
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _spec_to_wire(text: str, what: str) -> bytes:
    try:
        return parse_spec(text).to_bytes()
    except (ValueError, CodecError) as exc:
        raise ConfigError(f"{what}: not a codec spec: {text[:80]!r} ({exc})") from exc


def _spec_from_wire(raw: bytes, what: str) -> str:
    try:
        return format_spec(CodecSpec.from_bytes(raw))
    except (ValueError, CodecError) as exc:
        raise ConfigError(f"{what}: malformed codec spec ({exc})") from exc


def _parse(message: pb.RoundInstruction | pb.TrainReceipt, data: bytes, what: str) -> None:
    if not isinstance(data, bytes):
        raise ConfigError(f"{what} must be bytes, got {type(data).__name__}")
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise ConfigError(f"malformed {what}: {exc}") from exc


def instruction_to_bytes(instruction: RoundInstruction) -> bytes:
    """Serialize an instruction; fields at their defaults cost nothing."""
    if instruction.server_round < 0 or instruction.init_seed < -1:
        raise ConfigError("server_round and init_seed must not be negative")
    if instruction.down_budget < 0 or instruction.up_budget < 0:
        raise ConfigError("budgets must not be negative")
    if instruction.inline_limit < 0:
        raise ConfigError("inline_limit must not be negative")
    if bool(instruction.payload) != bool(instruction.payload_digest):
        raise ConfigError("an inline payload needs its digest, and a digest its payload")
    has_init = bool(instruction.init_digest) and instruction.init_seed >= 0
    message = pb.RoundInstruction(
        server_round=instruction.server_round,
        address=instruction.address,
        target_digest=_digest_to_wire(instruction.target, "target"),
        down_spec=_spec_to_wire(instruction.down_spec, "down_spec"),
        up_spec=_spec_to_wire(instruction.up_spec, "up_spec"),
        down_budget_bytes=instruction.down_budget,
        up_budget_bytes=instruction.up_budget,
        task=instruction.task if has_init else "",
        init_seed=instruction.init_seed if has_init else 0,
        init_digest=(_digest_to_wire(instruction.init_digest, "init_digest") if has_init else b""),
        token=instruction.token,
        tls=instruction.tls,
        track=_TRACK_TO_WIRE[instruction.track],
        payload=instruction.payload,
        payload_digest=(
            _digest_to_wire(instruction.payload_digest, "payload_digest")
            if instruction.payload
            else b""
        ),
        inline_limit_bytes=instruction.inline_limit,
    )
    return message.SerializeToString()


def instruction_from_bytes(data: bytes) -> RoundInstruction:
    """Inverse of :func:`instruction_to_bytes`; :class:`ConfigError` on bad input.

    The specs come back in their canonical text form (``format_spec``), which parses to
    the same :class:`CodecSpec` as the text that was sent.
    """
    message = pb.RoundInstruction()
    _parse(message, data, "round instruction")
    if not message.address:
        raise ConfigError("round instruction without a data-plane address")
    init_digest = _digest_from_wire(message.init_digest, "init_digest", optional=True)
    if bool(message.payload) != bool(message.payload_digest):
        raise ConfigError("round instruction with an inline payload but no digest, or the reverse")
    return RoundInstruction(
        server_round=message.server_round,
        address=message.address,
        target=_digest_from_wire(message.target_digest, "target"),
        down_spec=_spec_from_wire(message.down_spec, "down_spec"),
        up_spec=_spec_from_wire(message.up_spec, "up_spec"),
        task=message.task,
        init_seed=message.init_seed if init_digest else -1,
        init_digest=init_digest,
        down_budget=message.down_budget_bytes,
        up_budget=message.up_budget_bytes,
        token=message.token,
        tls=message.tls,
        track=_track_from_wire(message.track),
        payload=message.payload,
        payload_digest=_digest_from_wire(message.payload_digest, "payload_digest", optional=True),
        inline_limit=message.inline_limit_bytes,
    )


_TRACK_TO_WIRE = {
    ModelTrack.GLOBAL: pb.MODEL_TRACK_UNSPECIFIED,
    ModelTrack.STUDENT: pb.MODEL_TRACK_STUDENT,
}


def _track_from_wire(value: int) -> ModelTrack:
    for track, wire in _TRACK_TO_WIRE.items():
        if wire == value:
            return track
    raise ConfigError(f"round instruction with an unknown model track {value}")


def _seconds(value: float, what: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{what} must be a finite, non-negative number of seconds")
    return value


def receipt_to_bytes(receipt: TrainReceipt) -> bytes:
    """Serialize the receipt: ids, byte counts, timings, examples and (finite) loss."""
    if receipt.bytes_down < 0 or receipt.bytes_up < 0 or receipt.decoded_bytes < 0:
        raise ConfigError("byte counts must not be negative")
    if any(not 0 <= level < 256 for level in receipt.decoded_levels):
        raise ConfigError("decoded levels must be in 0..255")
    if receipt.update_id and receipt.update:
        raise ConfigError("a receipt names a pushed update or carries one inline, not both")
    message = pb.TrainReceipt(
        update_id=receipt.update_id,
        held_digest=_digest_to_wire(receipt.held, "held"),
        bytes_down=receipt.bytes_down,
        bytes_up=receipt.bytes_up,
        train_seconds=_seconds(receipt.train_seconds, "train_seconds"),
        fetch_seconds=_seconds(receipt.fetch_seconds, "fetch_seconds"),
        push_seconds=_seconds(receipt.push_seconds, "push_seconds"),
        decoded_bytes=receipt.decoded_bytes,
        decoded_levels=receipt.decoded_levels if receipt.decoded_bytes else (),
        update=receipt.update,
        num_examples=_examples(receipt.num_examples),
    )
    if math.isfinite(receipt.loss):
        message.loss = receipt.loss
    return message.SerializeToString()


def receipt_from_bytes(data: bytes, num_examples: int, loss: float) -> TrainReceipt:
    """Inverse of :func:`receipt_to_bytes`; ``num_examples`` and ``loss`` (the app's
    metrics) stand in for what the receipt lacks (an edge from before they moved into
    it)."""
    message = pb.TrainReceipt()
    _parse(message, data, "train receipt")
    if bool(message.update_id) == bool(message.update):
        raise ConfigError("train receipt without an update id or an inline update (or both)")
    return TrainReceipt(
        update_id=message.update_id,
        held=_digest_from_wire(message.held_digest, "held"),
        num_examples=message.num_examples if message.HasField("num_examples") else num_examples,
        loss=message.loss if message.HasField("loss") else loss,
        bytes_down=message.bytes_down,
        bytes_up=message.bytes_up,
        train_seconds=_seconds(message.train_seconds, "train_seconds"),
        fetch_seconds=_seconds(message.fetch_seconds, "fetch_seconds"),
        push_seconds=_seconds(message.push_seconds, "push_seconds"),
        decoded_bytes=message.decoded_bytes,
        decoded_levels=_levels(message.decoded_levels),
        update=message.update,
    )


def _examples(count: int) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ConfigError(f"num_examples must be a non-negative int, got {count!r}")
    return count


def _levels(levels: Sequence[int]) -> tuple[int, ...]:
    if len(levels) > 100_000 or any(level > 255 for level in levels):
        raise ConfigError("train receipt with implausible decoded levels")
    return tuple(levels)
