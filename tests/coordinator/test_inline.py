"""Payloads inline in the Flower messages, coordinator side: the inline download is the
stream the data plane would serve (same bytes, same decoded version kept), only when it
fits; inline updates aggregate as pushed ones do, and are refused over the limit."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from coordinator.dataplane import CoordinatorDataPlane, InstructionTemplate
from coordinator.strategy import CompressedStrategy, PulledUpdate
from coordinator.version_store import VersionStore
from edge.dataplane import GrpcConnector
from fedsqueeze.codec import CodecSpec, EncodedModel, EntropyCoder, encode_state, state_digest
from fedsqueeze.control import CONTROL_KEY, RECEIPT_KEY, ModelTrack, RoundInstruction, TrainReceipt

pytestmark = pytest.mark.timeout(120)

DOWN = "rank=2,quant=4,targets=*,min-ndim=1"


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(16, 12, generator=g), "b": torch.randn(12, generator=g)}


@pytest.fixture
def plane(tmp_path: Path) -> Iterable[CoordinatorDataPlane]:
    plane = CoordinatorDataPlane(VersionStore(tmp_path))
    yield plane
    plane.close()


def _instruction(plane: CoordinatorDataPlane, target: str, limit: int) -> RoundInstruction:
    template = InstructionTemplate(DOWN, "lossless", inline_limit=limit)
    return replace(plane.instruction(template, 2, 7, target), down_spec=DOWN)


def test_the_inline_download_is_what_the_data_plane_serves(plane: CoordinatorDataPlane) -> None:
    held_state = _model(0)
    held = plane.store.publish(held_state, track=None)
    target = plane.store.publish({k: v + 0.1 for k, v in _model(1).items()})
    instruction = plane.with_payload(_instruction(plane, target, 4096), held)
    assert instruction.payload and instruction.inline_limit == 4096
    # the edge-side version is kept, as a fetch keeps it
    assert plane.store.has(instruction.payload_digest)
    assert instruction.payload_digest != target  # lossy: the edge holds its own version
    fetched = GrpcConnector(held_versions=0).fetch(instruction, "7", held, held_state)
    assert fetched.digest == instruction.payload_digest
    served = EncodedModel.from_bytes(instruction.payload)
    assert served.base_digest is not None and served.base_digest.hex() == held
    assert len(instruction.payload) < fetched.bytes_down  # the data plane adds its framing


def test_no_inline_download_unless_it_fits(plane: CoordinatorDataPlane) -> None:
    held = plane.store.publish(_model(0), track=None)
    target = plane.store.publish(_model(1))
    instruction = _instruction(plane, target, 4096)
    assert plane.with_payload(instruction, held).payload
    assert not plane.with_payload(replace(instruction, inline_limit=64), held).payload
    assert not plane.with_payload(replace(instruction, inline_limit=0), held).payload
    assert not plane.with_payload(replace(instruction, down_budget=64), held).payload
    assert not plane.with_payload(instruction, None).payload  # unknown: a whole model
    assert not plane.with_payload(instruction, "ab" * 32).payload  # base no longer kept
    student = replace(instruction, track=ModelTrack.STUDENT)
    assert not plane.with_payload(student, held).payload
    progressive = replace(instruction, down_spec="quant=4,levels=2+2,targets=*,min-ndim=1")
    assert not plane.with_payload(progressive, held).payload


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> Iterable[int]:
        return self.nodes


def _plain(rnd: int, node: int, target: str) -> RoundInstruction:
    return RoundInstruction(rnd, "127.0.0.1:1", target, "lossless", "lossless", "", -1, "")


@pytest.mark.usefixtures("flower_identity")
@pytest.mark.parametrize("coder", [EntropyCoder.ZSTD, EntropyCoder.ANS])
def test_inline_updates_aggregate_as_pushed_ones(tmp_path: Path, coder: EntropyCoder) -> None:
    # With ANS (format v8) an inline update leaves its base digest to the receipt.
    spec = CodecSpec(entropy_coder=coder)
    nodes = [1, 2, 3]
    g = _model(0)
    results = []
    for inline in (False, True):
        store = VersionStore(tmp_path / str(inline))
        pushed: dict[str, PulledUpdate] = {}
        strategy = CompressedStrategy(FedAvg(), store, _plain, pushed.get, inline_limit=1 << 16)
        random.seed(0)
        sent = list(strategy.configure_train(1, ArrayRecord(g), ConfigRecord(), FakeGrid(nodes)))  # type: ignore[arg-type]
        target = RoundInstruction.from_record(sent[0].content.config_records[CONTROL_KEY]).target
        replies = []
        for msg in sent:
            node = msg.metadata.dst_node_id
            model = {k: v + 0.01 * node for k, v in g.items()}
            encoded = encode_state(model, spec, g, base_digest=bytes.fromhex(target))
            if inline:
                update = encoded.to_bytes(omit_base=True)
                assert len(update) == encoded.nbytes - (32 if coder is EntropyCoder.ANS else 0)
                receipt = TrainReceipt("", target, 10, 0.1, 0, 0, 0.0, 0.0, 0.0, update=update)
            else:
                pushed[f"u{node}"] = PulledUpdate(encoded, target, str(node))
                receipt = TrainReceipt(f"u{node}", target, 10, 0.1, 0, 0, 0.0, 0.0, 0.0)
            ids, metrics = receipt.to_records()
            replies.append(
                Message(RecordDict({RECEIPT_KEY: ids, "metrics": metrics}), reply_to=msg)
            )
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None and strategy.stats[1].accepted == 3
        results.append(arrays.to_torch_state_dict())
        # the round's model bytes include the inline updates (the receipts report 0)
        inline_bytes = sum(
            len(
                encode_state(
                    {k: v + 0.01 * n for k, v in g.items()},
                    spec,
                    g,
                    base_digest=bytes.fromhex(target),
                ).to_bytes(omit_base=True)
            )
            for n in nodes
        )
        assert strategy.stats[1].bytes_up == (inline_bytes if inline else 0)
    for name in g:
        assert torch.equal(results[0][name], results[1][name])


@pytest.mark.usefixtures("flower_identity")
def test_an_inline_update_over_the_limit_or_malformed_is_rejected(tmp_path: Path) -> None:
    g = _model(0)
    none: dict[str, PulledUpdate] = {}
    strategy = CompressedStrategy(
        FedAvg(), VersionStore(tmp_path), _plain, none.get, inline_limit=256
    )
    sent = list(strategy.configure_train(1, ArrayRecord(g), ConfigRecord(), FakeGrid([1, 2])))  # type: ignore[arg-type]
    target = RoundInstruction.from_record(sent[0].content.config_records[CONTROL_KEY]).target
    big = encode_state(
        {k: v + 1 for k, v in g.items()}, CodecSpec(), g, base_digest=bytes.fromhex(target)
    )
    assert big.nbytes > 256
    updates = {1: big.to_bytes(), 2: b"FSQ" + b"\0" * 40}
    replies = []
    for msg in sent:
        receipt = TrainReceipt(
            "", target, 10, 0.1, 0, 0, 0.0, 0.0, 0.0, update=updates[msg.metadata.dst_node_id]
        )
        ids, metrics = receipt.to_records()
        replies.append(Message(RecordDict({RECEIPT_KEY: ids, "metrics": metrics}), reply_to=msg))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None
    reasons = sorted(r.reason for r in strategy.stats[1].rejected)
    assert "limit of 256 B" in reasons[0] and "malformed inline update" in reasons[1]
    with pytest.raises(ValueError):
        CompressedStrategy(
            FedAvg(), VersionStore(tmp_path / "x"), _plain, none.get, inline_limit=-1
        )
    assert state_digest(g).hex() == target


def test_inline_bytes_is_a_validated_run_setting() -> None:
    from fedsqueeze.errors import ConfigError
    from fedsqueeze.runconfig import MAX_INLINE_BYTES, RunSettings

    assert RunSettings().inline_bytes == 0  # off unless a run asks for it
    assert RunSettings.from_run_config({"inline-bytes": 4096}).inline_bytes == 4096
    for bad in (-1, MAX_INLINE_BYTES + 1):
        with pytest.raises(ConfigError, match="inline-bytes"):
            RunSettings(inline_bytes=bad)


@pytest.mark.usefixtures("flower_identity")
def test_inline_downloads_count_as_the_rounds_model_bytes(tmp_path: Path) -> None:
    digest = state_digest(_model(5)).hex()

    def instruct(rnd: int, node: int, target: str) -> RoundInstruction:
        payload = b"\x07" * (100 * node)
        return replace(_plain(rnd, node, target), payload=payload, payload_digest=digest)

    none: dict[str, PulledUpdate] = {}
    strategy = CompressedStrategy(FedAvg(), VersionStore(tmp_path), instruct, none.get)
    g = _model(0)
    strategy.configure_evaluate(1, ArrayRecord(g), ConfigRecord(), FakeGrid([1, 2]))  # type: ignore[arg-type]
    sent = list(strategy.configure_train(1, ArrayRecord(g), ConfigRecord(), FakeGrid([1, 2])))  # type: ignore[arg-type]
    assert all(
        RoundInstruction.from_record(m.content.config_records[CONTROL_KEY]).payload for m in sent
    )
    strategy.aggregate_train(1, [])  # nobody replied: the downloads were still sent
    assert strategy.stats[1].bytes_down == 100 + 200  # training only, not evaluation
