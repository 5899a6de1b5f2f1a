"""The student track: assignment, versions and fetches, its own aggregation; FedDF fusion."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from coordinator.averaging import average_states
from coordinator.distill import DistillConfig
from coordinator.fusion import FeddfFusion
from coordinator.source import StoreModelSource
from coordinator.strategy import CompressedStrategy, PulledUpdate
from coordinator.student_track import (
    STUDENT_TRACK,
    StudentAssignment,
    StudentTrack,
    WeakLink,
)
from coordinator.version_store import VersionStore
from fedsqueeze.codec import CodecSpec, decode_state, encode_state
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.control import CONTROL_KEY, RECEIPT_KEY, ModelTrack, RoundInstruction, TrainReceipt
from fedsqueeze.tasks import get_task
from simulations.links import LINK_PROFILES
from tests.coordinator.test_strategy import FakeGrid

State = dict[str, torch.Tensor]
TASK = get_task("digits-cnn")


def _instruction(rnd: int, node: int, target: str) -> RoundInstruction:
    return RoundInstruction(rnd, "127.0.0.1:1", target, "lossless", "lossless", "digits-cnn", 0, "")


def _noisy(state: State, seed: int, scale: float = 0.01) -> State:
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in state.items()
    }


def _teacher() -> State:
    return {k: v.detach().clone() for k, v in TASK.build_model(0).state_dict().items()}


def _students(store: VersionStore, low_budget: set[int], refresh_every: int = 100) -> StudentTrack:
    assignment = StudentAssignment(
        budget_of=lambda node: 1000 if node in low_budget else 50_000, student_budget=2000
    )
    proxy = torch.rand(16, *TASK.load_data().x_train.shape[1:])
    config = DistillConfig(epochs=1, proxy_size=16, mixup=False)
    return StudentTrack(store, TASK, 0, proxy, config, refresh_every, assignment)


def test_weak_links_and_low_budgets_get_the_student() -> None:
    weak = {name for name, link in LINK_PROFILES.items() if WeakLink()(link)}
    assert weak == {"2g", "iot-lpwan", "satellite"}
    links = {1: LINK_PROFILES["2g"], 2: LINK_PROFILES["4g"], 3: LINK_PROFILES["wifi"]}
    budgets = {1: 0, 2: 0, 3: 1500}
    assign = StudentAssignment(
        link_of=links.get, budget_of=budgets.__getitem__, student_budget=2000
    )
    assert [assign.track_of(n) for n in (1, 2, 3)] == [
        ModelTrack.STUDENT,
        ModelTrack.GLOBAL,
        ModelTrack.STUDENT,  # a strong link, but a budget too small for the teacher
    ]
    links[1] = LINK_PROFILES["wifi"]  # an edge keeps its first track
    assert assign.track_of(1) is ModelTrack.STUDENT
    unknown = StudentAssignment(link_of=lambda node: None)
    assert unknown.track_of(7) is ModelTrack.GLOBAL  # undecided until its link is known


def test_the_student_is_a_track_of_its_own_served_by_the_same_data_plane(tmp_path: Path) -> None:
    store = VersionStore(tmp_path)
    teacher = store.publish(_teacher())
    students = _students(store, set())
    first = students.publish()
    assert store.head(STUDENT_TRACK) == first == students.init_digest
    assert store.head("global") == teacher != first
    students.state = _noisy(students.state, 1)
    second = students.publish()
    assert store.resolve(STUDENT_TRACK) == second and store.has(first)
    # A student edge fetches a lossy delta from the student it holds, like a teacher edge.
    source = StoreModelSource(store)
    spec = parse_spec("int8")
    encoded = source.encode(source.resolve(STUDENT_TRACK), first, spec, None)
    held = store.get(first)
    assert held is not None
    decoded = decode_state(encoded, held, base_digest=bytes.fromhex(first))
    for name, value in students.state.items():
        assert decoded[name].shape == value.shape
        assert torch.allclose(decoded[name].float(), value.float(), atol=0.01)
    n_student = sum(v.numel() for v in students.state.values())
    assert n_student * 4 <= sum(v.numel() for v in _teacher().values())


def _reply(msg: Message, receipt: TrainReceipt) -> Message:
    ids, metrics = receipt.to_records()
    return Message(RecordDict({RECEIPT_KEY: ids, "metrics": metrics}), reply_to=msg)


@pytest.mark.usefixtures("flower_identity")
def test_student_updates_aggregate_into_the_student_and_never_into_the_teacher(
    tmp_path: Path,
) -> None:
    store = VersionStore(tmp_path)
    students = _students(store, low_budget={3, 4})
    pushed: dict[str, PulledUpdate] = {}
    wrapper = CompressedStrategy(
        FedAvg(),
        store,
        _instruction,
        pushed.get,
        students=students,
        student_instruction=_instruction,
    )
    g = _teacher()
    random.seed(0)
    sent = list(wrapper.configure_train(1, ArrayRecord(g), ConfigRecord(), FakeGrid([1, 2, 3, 4])))  # type: ignore[arg-type]
    told = {
        m.metadata.dst_node_id: RoundInstruction.from_record(m.content.config_records[CONTROL_KEY])
        for m in sent
    }
    assert {n: i.track for n, i in told.items()} == {
        1: ModelTrack.GLOBAL,
        2: ModelTrack.GLOBAL,
        3: ModelTrack.STUDENT,
        4: ModelTrack.STUDENT,
    }
    student_target = told[3].target
    assert student_target == store.head(STUDENT_TRACK) != told[1].target
    s0 = dict(students.state)
    models = {1: _noisy(g, 1), 2: _noisy(g, 2), 3: _noisy(s0, 3), 4: _noisy(s0, 4)}
    examples = {1: 10, 2: 30, 3: 20, 4: 60}
    replies = []
    for msg in sent:
        node = msg.metadata.dst_node_id
        base = g if node in (1, 2) else s0
        pushed[f"u{node}"] = PulledUpdate(
            encode_state(models[node], CodecSpec(), base), told[node].target, str(node)
        )
        receipt = TrainReceipt(f"u{node}", told[node].target, examples[node], 0.1, 9, 5, 0, 0, 0)
        replies.append(_reply(msg, receipt))
    arrays, _ = wrapper.aggregate_train(1, replies)
    stats = wrapper.stats[1]
    assert stats.accepted == 4 and stats.student_accepted == 2 and stats.aggregated
    assert arrays is not None
    teacher = arrays.to_torch_state_dict()
    want_teacher = average_states([models[1], models[2]], [10, 30])
    want_student = average_states([models[3], models[4]], [20, 60])
    for name in g:
        assert torch.allclose(teacher[name], want_teacher[name], atol=1e-6), name
    for name in s0:
        assert torch.allclose(students.state[name], want_student[name], atol=1e-6), name
    assert store.edge_version("3") == student_target
    assert stats.bytes_down == 36 and stats.bytes_up == 20


@pytest.mark.usefixtures("flower_identity")
def test_feddf_fusion_leaves_the_model_unchanged_when_every_client_holds_it(
    tmp_path: Path,
) -> None:
    store = VersionStore(tmp_path)
    proxy = torch.rand(32, *TASK.load_data().x_train.shape[1:])
    fusion = FeddfFusion(proxy, DistillConfig(epochs=2, proxy_size=32))

    def fused(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
        return fusion(states, weights, lambda: TASK.build_model(0))

    pushed: dict[str, PulledUpdate] = {}
    wrapper = CompressedStrategy(FedAvg(), store, _instruction, pushed.get, aggregate_global=fused)
    g = _teacher()
    sent = list(wrapper.configure_train(1, ArrayRecord(g), ConfigRecord(), FakeGrid([1, 2, 3])))  # type: ignore[arg-type]
    target = RoundInstruction.from_record(sent[0].content.config_records[CONTROL_KEY]).target
    replies = []
    for msg in sent:
        node = msg.metadata.dst_node_id
        pushed[f"u{node}"] = PulledUpdate(encode_state(g, CodecSpec(), g), target, str(node))
        replies.append(_reply(msg, TrainReceipt(f"u{node}", target, 5 * node, 0.1, 1, 1, 0, 0, 0)))
    arrays, metrics = wrapper.aggregate_train(1, replies)
    assert arrays is not None and isinstance(metrics, MetricRecord)
    out = arrays.to_torch_state_dict()
    for name, value in g.items():
        assert torch.equal(out[name], value), name
    # Different client models: fusion moves the average towards the ensemble's outputs.
    a, b = _noisy(g, 1, 0.05), _noisy(g, 2, 0.05)
    moved = fused([a, b], [1.0, 1.0])
    mean = average_states([a, b], [1.0, 1.0])
    assert any(not torch.allclose(moved[k], mean[k]) for k in mean)


@pytest.mark.usefixtures("flower_identity")
def test_fusion_waits_for_its_warmup_rounds(tmp_path: Path) -> None:
    store = VersionStore(tmp_path)
    calls: list[int] = []

    def fused(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
        calls.append(len(states))
        return {k: torch.zeros_like(v) for k, v in states[0].items()}

    pushed: dict[str, PulledUpdate] = {}
    wrapper = CompressedStrategy(
        FedAvg(), store, _instruction, pushed.get, aggregate_global=fused, fusion_warmup=2
    )
    g = _teacher()
    for rnd in (1, 2, 3):
        sent = list(wrapper.configure_train(rnd, ArrayRecord(g), ConfigRecord(), FakeGrid([1, 2])))  # type: ignore[arg-type]
        target = RoundInstruction.from_record(sent[0].content.config_records[CONTROL_KEY]).target
        replies, models = [], []
        for msg in sent:
            node = msg.metadata.dst_node_id
            model = _noisy(g, 10 * rnd + node)
            models.append(model)
            pushed[f"u{rnd}{node}"] = PulledUpdate(
                encode_state(model, CodecSpec(), g), target, str(node)
            )
            receipt = TrainReceipt(f"u{rnd}{node}", target, 10, 0.1, 1, 1, 0, 0, 0)
            replies.append(_reply(msg, receipt))
        arrays, _ = wrapper.aggregate_train(rnd, replies)
        assert arrays is not None
        out = arrays.to_torch_state_dict()
        mean = average_states(models, [10.0, 10.0])
        if rnd <= 2:  # warm-up: the plain average, fusion not called
            assert calls == []
            assert all(torch.allclose(out[k], mean[k], atol=1e-6) for k in mean)
        else:
            assert calls == [2]
            assert all(torch.equal(out[k], torch.zeros_like(out[k])) for k in out)
    with pytest.raises(ValueError, match="fusion_warmup"):
        CompressedStrategy(FedAvg(), store, _instruction, pushed.get, fusion_warmup=-1)
