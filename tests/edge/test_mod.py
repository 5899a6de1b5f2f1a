"""The edge mod with a fake data plane: fetch, train, encode, push, receipt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from edge.cache import ContextCache, DirectoryCache, EdgeMemory
from edge.dataplane import Fetched, Pushed
from edge.mod import fit_update, make_mod
from fedsqueeze.codec import CodecSpec, EncodedModel, QuantSpec, decode_state, state_digest
from fedsqueeze.control import CONTROL_KEY, RECEIPT_KEY, RoundInstruction, TrainReceipt

pytestmark = pytest.mark.usefixtures("flower_identity")

GLOBAL = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.zeros(4)}
DIGEST = state_digest(GLOBAL).hex()


class FakePlane:
    def __init__(self) -> None:
        self.fetches: list[str | None] = []
        self.pushed: list[tuple[str, EncodedModel]] = []

    def fetch(self, instruction, edge_id, held_digest, held, *, parts=None):
        self.fetches.append(held_digest)
        return Fetched({k: v.clone() for k, v in GLOBAL.items()}, DIGEST, 1000, 100)

    def push(self, instruction, edge_id, update_id, base_digest, encoded):
        self.pushed.append((base_digest, encoded))
        return Pushed(50, 500)


def _instruction(init_digest: str = "") -> RoundInstruction:
    return RoundInstruction(
        1,
        "127.0.0.1:1",
        DIGEST,
        "int8",
        "topk10-int4",
        "digits-cnn",
        0,
        init_digest,
        token="t" * 20,
    )


def _context() -> Context:
    return Context(
        run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )


def _train_app(msg: Message, context: Context) -> Message:
    state = msg.content.array_records["arrays"].to_torch_state_dict()
    trained = {k: v + 0.5 for k, v in state.items()}
    metrics = MetricRecord({"num-examples": 12, "train-loss": 0.25, "compute-seconds": 0.1})
    return Message(RecordDict({"arrays": ArrayRecord(trained), "metrics": metrics}), reply_to=msg)


def _message(instruction: RoundInstruction | None) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    if instruction is not None:
        content[CONTROL_KEY] = instruction.to_record()
    return Message(content, dst_node_id=7, message_type="train")


def test_train_round_trip_pushes_update_and_replies_with_receipt() -> None:
    plane = FakePlane()
    mod = make_mod(connector=plane, initial_model=None)
    ctx = _context()
    reply = mod(_message(_instruction()), ctx, _train_app)
    assert not reply.content.array_records, "the model must not go back through Flower"
    receipt = TrainReceipt.from_records(reply.content.config_records[RECEIPT_KEY])
    assert receipt.held == DIGEST and receipt.num_examples == 12
    assert receipt.bytes_down == 1050 and receipt.bytes_up == 600
    # Examples, loss and seconds travel in the receipt: the app reported nothing else.
    assert "metrics" not in reply.content.metric_records
    base_digest, encoded = plane.pushed[0]
    assert base_digest == DIGEST
    decoded = decode_state(encoded, GLOBAL)
    assert set(decoded) == set(GLOBAL)
    # the held model and the error-feedback residual survive for the next round
    memory = ContextCache(ctx.state).load()
    assert memory.held_digest == DIGEST and memory.residual is not None
    mod(_message(_instruction()), ctx, _train_app)
    assert plane.fetches == [None, DIGEST]  # second round asks for a delta from what it holds


def test_initial_model_is_rebuilt_from_the_seed_when_digests_match() -> None:
    plane = FakePlane()
    mod = make_mod(
        connector=plane, initial_model=lambda task, seed: {k: v.clone() for k, v in GLOBAL.items()}
    )
    mod(_message(_instruction(init_digest=DIGEST)), _context(), _train_app)
    assert plane.fetches == [DIGEST]
    wrong = FakePlane()
    mod = make_mod(connector=wrong, initial_model=lambda task, seed: {"w": torch.ones(1)})
    mod(_message(_instruction(init_digest=DIGEST)), _context(), _train_app)
    assert wrong.fetches == [None]  # a mismatching rebuild is not trusted


def test_messages_without_an_instruction_pass_through() -> None:
    plane = FakePlane()
    mod = make_mod(connector=plane, initial_model=None)
    msg = _message(None)
    msg.content["arrays"] = ArrayRecord(GLOBAL)
    reply = mod(msg, _context(), _train_app)
    assert "arrays" in reply.content.array_records
    assert plane.fetches == [] and plane.pushed == []


def test_an_app_error_is_returned_and_nothing_is_pushed() -> None:
    plane = FakePlane()
    mod = make_mod(connector=plane, initial_model=None)

    def failing(msg: Message, context: Context) -> Message:
        raise RuntimeError("training failed")

    with pytest.raises(RuntimeError):
        mod(_message(_instruction()), _context(), failing)
    assert plane.pushed == []


def test_directory_cache_round_trip_and_tampering(tmp_path: Path) -> None:
    cache = DirectoryCache(tmp_path)
    assert cache.load() == EdgeMemory(None, None, None)
    cache.save(EdgeMemory(DIGEST, GLOBAL, {"w": torch.ones(3, 4)}))
    loaded = DirectoryCache(tmp_path).load()
    assert loaded.held_digest == DIGEST and loaded.held is not None
    assert torch.equal(loaded.held["w"], GLOBAL["w"])
    # a held model whose bytes no longer match its digest is not trusted
    DirectoryCache(tmp_path).save(EdgeMemory(DIGEST, {k: v + 1 for k, v in GLOBAL.items()}, None))
    assert DirectoryCache(tmp_path).load().held_digest is None


def test_evaluate_messages_fetch_the_model_and_return_the_apps_metrics() -> None:
    plane = FakePlane()
    mod = make_mod(connector=plane, initial_model=None)
    seen: dict[str, torch.Tensor] = {}

    def evaluate_app(msg: Message, context: Context) -> Message:
        seen.update(msg.content.array_records["arrays"].to_torch_state_dict())
        return Message(RecordDict({"metrics": MetricRecord({"eval-acc": 0.9})}), reply_to=msg)

    content = RecordDict({CONTROL_KEY: _instruction().to_record()})
    reply = mod(Message(content, dst_node_id=7, message_type="evaluate"), _context(), evaluate_app)
    assert torch.equal(seen["w"], GLOBAL["w"])
    assert reply.content.metric_records["metrics"]["eval-acc"] == 0.9
    assert plane.pushed == []  # nothing to upload after an evaluation


# --- fitting the update to its byte limit ------------------------------------------------


def _fit_case() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    base = {"fc.weight": torch.randn(64, 200, generator=g), "fc.bias": torch.randn(64, generator=g)}
    trained = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    return base, trained


def test_fit_update_lowers_the_rank_until_the_update_fits() -> None:
    base, trained = _fit_case()
    spec = CodecSpec(rank=16, quant=QuantSpec(4), targets=("*",), min_ndim=1)
    kwargs = {"residual": None, "seed": 1, "base_digest": b"\x01" * 32}
    full = fit_update(trained, spec, base, **kwargs)  # type: ignore[arg-type]
    assert full.spec.rank == 16
    budget = full.nbytes // 3
    fitted = fit_update(trained, spec, base, budget=budget, **kwargs)  # type: ignore[arg-type]
    assert fitted.nbytes <= budget
    assert fitted.spec.rank is not None and 1 <= fitted.spec.rank < 16
    # the highest rank that fits: one more would not
    higher = fit_update(
        trained,
        spec.with_changes(rank=fitted.spec.rank + 1),
        base,
        **kwargs,  # type: ignore[arg-type]
    )
    assert higher.nbytes > budget or fitted.spec.rank + 1 > 16
    # the residual is what this encoding left out
    out = decode_state(fitted, base, base_digest=b"\x01" * 32)
    assert fitted.residual is not None
    for k in trained:
        assert torch.allclose(
            fitted.residual[k], (trained[k] - base[k]) - (out[k] - base[k]), atol=1e-5
        )
    # no limit, or a limit that fits: encoded as asked
    assert fit_update(trained, spec, base, budget=0, **kwargs).spec.rank == 16  # type: ignore[arg-type]
    assert fit_update(trained, spec, base, budget=full.nbytes, **kwargs).spec.rank == 16  # type: ignore[arg-type]


def test_fit_update_sends_a_spec_it_cannot_shrink_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    base, trained = _fit_case()
    spec = CodecSpec(topk=0.5, quant=QuantSpec(8), targets=("*",), min_ndim=1)
    with caplog.at_level("WARNING", logger="edge.mod"):
        encoded = fit_update(
            trained, spec, base, residual=None, seed=1, base_digest=b"\x01" * 32, budget=100
        )
    assert encoded.spec == spec and encoded.nbytes > 100
    assert "over its budget" in caplog.text
