"""Payloads inline in the Flower messages (run setting ``inline-bytes``): the edge uses an
inline download only when it is a delta from exactly what it holds and decodes to the
named digest (else it fetches from the data plane), and returns an update inline only
when it fits the instruction's limit (else it pushes)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from edge.cache import ContextCache, EdgeMemory
from edge.dataplane import Fetched, Pushed
from edge.mod import make_mod
from fedsqueeze.codec import EncodedModel, decode_state, encode_state, state_digest
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.control import CONTROL_KEY, RECEIPT_KEY, RoundInstruction, TrainReceipt
from fedsqueeze.errors import FormatError

pytestmark = pytest.mark.usefixtures("flower_identity")

HELD = {"w": torch.linspace(-1, 1, 48).reshape(6, 8), "b": torch.zeros(8)}
HELD_DIGEST = state_digest(HELD).hex()
TARGET = {
    "w": HELD["w"] + 0.25 * torch.outer(torch.ones(6), torch.linspace(0, 1, 8)),
    "b": torch.full((8,), 0.125),
}
TARGET_DIGEST = state_digest(TARGET).hex()
DOWN = "rank=2,quant=8,targets=*,min-ndim=1"


class FakePlane:
    def __init__(self) -> None:
        self.fetches = 0
        self.pushed: list[EncodedModel] = []

    def fetch(self, instruction, edge_id, held_digest, held, *, parts=None):
        self.fetches += 1
        return Fetched({k: v.clone() for k, v in TARGET.items()}, TARGET_DIGEST, 1000, 100)

    def push(self, instruction, edge_id, update_id, base_digest, encoded):
        self.pushed.append(encoded)
        return Pushed(50, 500)


ANS = ",entropy=ans"  # format v8: inline deltas leave their base digest to the carrier


def _payload(base: dict[str, torch.Tensor] | None = HELD, coder: str = "") -> tuple[bytes, str]:
    base_digest = state_digest(base) if base is not None else None
    spec = parse_spec(DOWN + coder)
    encoded = encode_state(TARGET, spec, base, seed=1, base_digest=base_digest)
    payload = encoded.to_bytes(omit_base=True)
    assert (len(payload) == encoded.nbytes - 32) == (coder == ANS and base is not None)
    return payload, state_digest(decode_state(encoded, base)).hex()


def _instruction(coder: str = "", **changes: object) -> RoundInstruction:
    payload, digest = _payload(coder=coder)
    base = RoundInstruction(
        3,
        "127.0.0.1:1",
        TARGET_DIGEST,
        DOWN + coder,
        "rank=2,quant=4,targets=*,min-ndim=1" + coder,
        "",
        -1,
        "",
        payload=payload,
        payload_digest=digest,
        inline_limit=4096,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def _context(held: dict[str, torch.Tensor] | None = HELD) -> Context:
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    if held is not None:
        ContextCache(ctx.state).save(EdgeMemory(state_digest(held).hex(), held, None))
    return ctx


def _train(msg: Message, context: Context) -> Message:
    state = msg.content.array_records["arrays"].to_torch_state_dict()
    trained = {k: v + 0.5 for k, v in state.items()}
    metrics = MetricRecord({"num-examples": 12, "train-loss": 0.25})
    return Message(RecordDict({"arrays": ArrayRecord(trained), "metrics": metrics}), reply_to=msg)


def _run(instruction: RoundInstruction, ctx: Context, plane: FakePlane) -> TrainReceipt:
    content = RecordDict({"config": ConfigRecord({"server-round": 3})})
    content[CONTROL_KEY] = instruction.to_record()
    msg = Message(content, dst_node_id=7, message_type="train")
    reply = make_mod(connector=plane, initial_model=None)(msg, ctx, _train)
    return TrainReceipt.from_records(reply.content.config_records[RECEIPT_KEY])


@pytest.mark.parametrize("coder", ["", ANS])
def test_an_inline_download_and_update_use_no_data_plane(coder: str) -> None:
    plane, ctx = FakePlane(), _context()
    instruction = _instruction(coder)
    receipt = _run(instruction, ctx, plane)
    assert plane.fetches == 0 and plane.pushed == []
    assert receipt.bytes_down == receipt.bytes_up == 0
    assert receipt.update_id == "" and receipt.update
    assert receipt.held == instruction.payload_digest  # what the payload decodes to
    memory = ContextCache(ctx.state).load()
    assert memory.held_digest == instruction.payload_digest and memory.held is not None
    held = bytes.fromhex(receipt.held)
    if coder:  # the update leaves its base to the receipt
        with pytest.raises(FormatError, match="base_digest"):
            EncodedModel.from_bytes(receipt.update)
    update = EncodedModel.from_bytes(receipt.update, base_digest=held)
    assert update.base_digest is not None and update.base_digest.hex() == receipt.held
    trained = decode_state(update, memory.held)
    assert set(trained) == set(HELD) and memory.residual is not None


def test_an_update_over_the_limit_is_pushed() -> None:
    plane = FakePlane()
    receipt = _run(_instruction(inline_limit=10), _context(), plane)
    assert plane.fetches == 0 and len(plane.pushed) == 1
    assert receipt.update == b"" and receipt.update_id
    off = FakePlane()
    receipt = _run(_instruction(inline_limit=0), _context(), off)
    assert len(off.pushed) == 1 and receipt.update == b""


@pytest.mark.parametrize("coder", ["", ANS])
@pytest.mark.parametrize(
    "case", ["another-base", "nothing-held", "wrong-digest", "corrupt", "no-payload"]
)
def test_an_unusable_inline_download_is_fetched_instead(case: str, coder: str) -> None:
    plane = FakePlane()
    instruction, ctx = _instruction(coder), _context()
    if case == "another-base":
        ctx = _context({k: v + 1 for k, v in HELD.items()})
    elif case == "nothing-held":
        ctx = _context(None)
    elif case == "wrong-digest":
        instruction = replace(instruction, payload_digest=TARGET_DIGEST)
    elif case == "corrupt":
        payload = bytearray(instruction.payload)
        payload[len(payload) // 2] ^= 0xFF
        instruction = replace(instruction, payload=bytes(payload))
    else:
        instruction = replace(instruction, payload=b"", payload_digest="")
    receipt = _run(instruction, ctx, plane)
    assert plane.fetches == 1
    assert receipt.held == TARGET_DIGEST and receipt.bytes_down == 1000


def test_a_whole_model_inline_needs_no_held_version() -> None:
    payload, digest = _payload(None)
    plane = FakePlane()
    receipt = _run(_instruction(payload=payload, payload_digest=digest), _context(None), plane)
    assert plane.fetches == 0 and receipt.held == digest
