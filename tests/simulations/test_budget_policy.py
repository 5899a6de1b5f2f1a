"""The budget policies never exceed a client's budget: checked on the wire, not estimated.

Each case fetches the model the policy sized, over the real data plane on loopback, and
pushes an update encoded with the upload spec it chose; the bytes the transport counted
must be within the budget in both directions.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from coordinator.budget import (
    Budget,
    Choice,
    EdgeRequest,
    LadderPolicy,
    RunBudget,
    Skip,
)
from coordinator.dataplane import CoordinatorDataPlane, InstructionTemplate
from coordinator.version_store import VersionStore
from edge.dataplane import GrpcConnector
from edge.mod import fit_update
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.tasks import get_task
from fedsqueeze.transport.shaping import LinkProfile
from simulations.baselines import ADAPTIVE_DOWN_LADDER, ADAPTIVE_UP_LADDER, FRONTIER_DOWN_LADDER

State = dict[str, torch.Tensor]
NODE = 4242


def _perturbed(state: State, scale: float, seed: int) -> State:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def _spread(state: State, every: int) -> State:
    """An update whose largest entries are evenly spaced: the costliest positions."""
    out = {}
    for k, v in state.items():
        flat = torch.full((v.numel(),), 1e-4)
        flat[::every] = 1.0
        out[k] = v + flat.view(v.shape)
    return out


class Plane:
    def __init__(self, root: Path) -> None:
        self.store = VersionStore(root, keep=64)
        self.init = dict(get_task("digits-cnn").build_model(0).state_dict())
        self.init_digest = self.store.publish(self.init, track="init")
        self.plane = CoordinatorDataPlane(self.store)
        self.connector = GrpcConnector()
        self.template = InstructionTemplate("int8", "int8", "digits-cnn", 0, self.init_digest)

    def transfer(
        self,
        choice: Choice,
        target: str,
        update: State,
        residual: State | None,
        held: tuple[str, State] | None = None,
    ) -> tuple[int, int]:
        """Fetch ``target`` as the policy said (against ``held``, digest and state: the
        initial model if not given), push ``update``: wire bytes both ways."""
        from dataclasses import replace

        instruction = replace(
            self.plane.instruction(self.template, 1, NODE, target),
            down_spec=choice.down_spec,
            up_spec=choice.up_spec,
            down_budget=choice.down_payload,
        )
        held_digest, held_state = held or (self.init_digest, self.init)
        fetched = self.connector.fetch(instruction, str(NODE), held_digest, held_state)
        # As the edge does: the instruction's payload limit, the rank lowered to fit it.
        encoded = fit_update(
            update,
            parse_spec(choice.up_spec),
            fetched.state,
            residual=residual,
            seed=0,
            base_digest=bytes.fromhex(fetched.digest),
            budget=choice.up_payload,
        )
        update_id = f"{NODE}-r1-{next(_ids):012x}"
        pushed = self.connector.push(instruction, str(NODE), update_id, fetched.digest, encoded)
        return fetched.bytes_down + pushed.bytes_down, fetched.bytes_up + pushed.bytes_up


_ids = itertools.count(1)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    p = Plane(tmp_path)
    try:
        yield p
    finally:
        p.plane.close()


BUDGETS = [(0, 0), (40_000, 20_000), (6_000, 3_000), (3_000, 2_000), (2_000, 1_200), (1_400, 900)]


@pytest.mark.parametrize(("down", "up"), BUDGETS)
@pytest.mark.parametrize("drift", [0.003, 0.05])
@pytest.mark.parametrize("ladder", [ADAPTIVE_DOWN_LADDER, FRONTIER_DOWN_LADDER])
def test_adaptive_never_exceeds_the_budget_on_the_wire(
    plane: Plane, down: int, up: int, drift: float, ladder: tuple[str, ...]
) -> None:
    target_state = _perturbed(plane.init, drift, seed=1)
    target = plane.store.publish(target_state)
    policy = LadderPolicy(plane.store, ladder, ADAPTIVE_UP_LADDER, budget=Budget(down, up))
    choice = policy.choose(EdgeRequest(1, NODE, target, plane.init_digest))
    if isinstance(choice, Skip):
        assert down and down < 2_000  # only the tightest budgets may skip
        return
    assert (down == 0 or choice.down_bytes <= down) and (up == 0 or choice.up_bytes <= up)
    for update, residual in (
        (_perturbed(target_state, 0.02, seed=2), None),
        (
            _spread(target_state, every=33),
            _perturbed({k: 0 * v for k, v in plane.init.items()}, 0.01, 3),
        ),
    ):
        wire_down, wire_up = plane.transfer(choice, target, update, residual)
        assert wire_down <= choice.down_bytes, (choice, wire_down)
        assert wire_up <= choice.up_bytes, (choice, wire_up)


def test_adaptive_takes_the_first_rung_that_fits(plane: Plane) -> None:
    target = plane.store.publish(_perturbed(plane.init, 0.05, seed=1))
    generous = LadderPolicy(plane.store, ADAPTIVE_DOWN_LADDER, ADAPTIVE_UP_LADDER)
    best = generous.choose(EdgeRequest(1, NODE, target, plane.init_digest))
    assert isinstance(best, Choice)
    assert (best.down_spec, best.up_spec) == (ADAPTIVE_DOWN_LADDER[0], ADAPTIVE_UP_LADDER[0])
    tight = LadderPolicy(
        plane.store, ADAPTIVE_DOWN_LADDER, ADAPTIVE_UP_LADDER, budget=Budget(5_000, 2_500)
    )
    choice = tight.choose(EdgeRequest(1, NODE, target, plane.init_digest))
    assert isinstance(choice, Choice)
    i = ADAPTIVE_DOWN_LADDER.index(choice.down_spec)
    assert i > 0 and choice.down_bytes <= 5_000
    # the rung before it (less error) would not have fitted
    above = LadderPolicy(
        plane.store, ADAPTIVE_DOWN_LADDER[i - 1 : i], ADAPTIVE_UP_LADDER, budget=Budget(5_000, 0)
    )
    assert isinstance(above.choose(EdgeRequest(1, NODE, target, plane.init_digest)), Skip)


def test_a_budget_too_small_for_the_last_rung_skips_with_a_reason(plane: Plane) -> None:
    target = plane.store.publish(_perturbed(plane.init, 0.05, seed=1))
    for budget in (Budget(300, 0), Budget(0, 300)):
        skip = LadderPolicy(
            plane.store, ADAPTIVE_DOWN_LADDER, ADAPTIVE_UP_LADDER, budget=budget
        ).choose(EdgeRequest(1, NODE, target, plane.init_digest))
        assert isinstance(skip, Skip) and "does not fit" in skip.reason


def test_fixed_policy_skips_when_its_specs_do_not_fit(plane: Plane) -> None:
    target = plane.store.publish(_perturbed(plane.init, 0.05, seed=1))
    request = EdgeRequest(1, NODE, target, plane.init_digest)
    fits = LadderPolicy.fixed(plane.store, "int8", "topk10-int4", budget=Budget(50_000, 10_000))
    assert isinstance(fits.choose(request), Choice)
    too_big = LadderPolicy.fixed(plane.store, "int8", "topk10-int4", budget=Budget(20_000, 0))
    assert isinstance(too_big.choose(request), Skip)


def test_an_edge_holding_the_target_gets_a_zero_delta(plane: Plane) -> None:
    policy = LadderPolicy(plane.store, ADAPTIVE_DOWN_LADDER[-1:], ADAPTIVE_UP_LADDER)
    choice = policy.choose(EdgeRequest(1, NODE, plane.init_digest, plane.init_digest))
    assert isinstance(choice, Choice) and choice.down_spec == "lossless"
    wire_down, _ = plane.transfer(choice, plane.init_digest, plane.init, None)
    assert wire_down <= choice.down_bytes < 1_500


def test_run_budget_shares_what_is_left_over_rounds_and_clients(plane: Plane) -> None:
    target = plane.store.publish(_perturbed(plane.init, 0.05, seed=1))
    policy = LadderPolicy(
        plane.store,
        ADAPTIVE_DOWN_LADDER,
        ADAPTIVE_UP_LADDER,
        run_budget=RunBudget(200_000, down_share=0.6),
        num_rounds=4,
        clients_per_round=5,
    )
    first = policy.choose(EdgeRequest(1, NODE, target, plane.init_digest))
    assert isinstance(first, Choice)
    assert first.down_bytes <= 120_000 / 20 and first.up_bytes <= 80_000 / 20
    policy.observe(60_000, 40_000)  # round 1 spent half: 15 client-rounds share the rest
    second = policy.choose(EdgeRequest(2, NODE, target, plane.init_digest))
    assert isinstance(second, Choice)
    assert second.down_bytes <= 60_000 / 15 and second.up_bytes <= 40_000 / 15
    assert second.down_bytes + second.up_bytes < first.down_bytes + first.up_bytes


def test_run_budget_spent_means_skip(plane: Plane) -> None:
    target = plane.store.publish(_perturbed(plane.init, 0.05, seed=1))
    policy = LadderPolicy(
        plane.store,
        ADAPTIVE_DOWN_LADDER,
        ADAPTIVE_UP_LADDER,
        run_budget=RunBudget(100_000),
        num_rounds=2,
        clients_per_round=2,
    )
    policy.observe(60_000, 60_000)
    assert isinstance(policy.choose(EdgeRequest(2, NODE, target, plane.init_digest)), Skip)


def test_link_and_deadline_limit_what_fits(plane: Plane) -> None:
    target = plane.store.publish(_perturbed(plane.init, 0.05, seed=1))
    request = EdgeRequest(1, NODE, target, plane.init_digest)
    slow = LinkProfile.from_mbit(0.05, 0.02, 100)  # 6.25 kB/s down, 2.5 kB/s up
    for deadline in (10.0, 4.0):
        policy = LadderPolicy(
            plane.store,
            ADAPTIVE_DOWN_LADDER,
            ADAPTIVE_UP_LADDER,
            link_of=lambda node: slow,
            deadline_s=deadline,
        )
        choice = policy.choose(request)
        assert isinstance(choice, Choice)
        seconds = (
            choice.down_bytes / 6250 + choice.up_bytes / 2500 + 5 * 0.1 + 1024 / 6250 + 1024 / 2500
        )
        assert seconds <= deadline
    hopeless = LadderPolicy(
        plane.store,
        ADAPTIVE_DOWN_LADDER,
        ADAPTIVE_UP_LADDER,
        link_of=lambda node: slow,
        deadline_s=0.5,
    )
    assert isinstance(hopeless.choose(request), Skip)
    assert math.isfinite(slow.rtt_s)


def _low_rank_update(state: State, rank: int, seed: int) -> State:
    """A dense, exactly low-rank change of every matrix: what factors fit best."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.dim() >= 2:
            m = v.shape[0]
            n = v.numel() // m
            a, b = torch.randn(m, rank, generator=g), torch.randn(rank, n, generator=g)
            out[k] = v + 0.01 * (a @ b).view(v.shape)
        else:
            out[k] = v.clone()
    return out


@pytest.mark.parametrize("drift", [0.003, 0.05])
def test_student_edges_get_their_own_budget_and_it_holds_on_the_wire(
    plane: Plane, drift: float
) -> None:
    """``distill``'s budgets: the teacher's 3.7 kB / 2.4 kB, the student's 595 B / 531 B.
    A student edge's choice fits the student budget on the wire; a teacher edge of the
    same policy keeps the teacher's budget, and without a student budget a student edge
    gets the teacher's."""
    build_student = get_task("digits-cnn").build_student
    assert build_student is not None
    student_init = dict(build_student(0).state_dict())
    init_digest = plane.store.publish(student_init, track="student")
    student_state = _perturbed(student_init, drift, seed=1)
    target = plane.store.publish(student_state, track="student")
    teacher_target = plane.store.publish(_perturbed(plane.init, drift, seed=1))
    policy = LadderPolicy(
        plane.store,
        ADAPTIVE_DOWN_LADDER,
        ADAPTIVE_UP_LADDER,
        budget=Budget(3_700, 2_400),
        student_budget=Budget(595, 531),
    )
    choice = policy.choose(EdgeRequest(1, NODE, target, init_digest, student=True))
    assert isinstance(choice, Choice), choice
    assert choice.down_bytes <= 595 and choice.up_bytes <= 531
    for update, residual in (
        (_perturbed(student_state, 0.02, seed=2), None),
        (
            _spread(student_state, every=33),
            _perturbed({k: 0 * v for k, v in student_init.items()}, 0.01, 3),
        ),
    ):
        wire_down, wire_up = plane.transfer(
            choice, target, update, residual, held=(init_digest, student_init)
        )
        assert wire_down <= choice.down_bytes <= 595, (choice, wire_down)
        assert wire_up <= choice.up_bytes <= 531, (choice, wire_up)
    teacher = policy.choose(EdgeRequest(1, NODE + 1, teacher_target, plane.init_digest))
    assert isinstance(teacher, Choice) and 595 < teacher.down_bytes <= 3_700
    assert 531 < teacher.up_bytes <= 2_400
    shared = LadderPolicy(
        plane.store, ADAPTIVE_DOWN_LADDER, ADAPTIVE_UP_LADDER, budget=Budget(3_700, 2_400)
    )
    whole = shared.choose(EdgeRequest(1, NODE + 2, target, init_digest, student=True))
    assert isinstance(whole, Choice) and whole.down_bytes > 595 and whole.up_bytes > 531


def test_low_rank_uploads_are_picked_by_expected_size_and_fit_on_the_wire(
    plane: Plane,
) -> None:
    """A rung whose bound does not fit is still taken when its expected size does; the
    edge lowers the rank of an update that comes out larger, and the wire stays in budget.
    """
    target_state = _perturbed(plane.init, 0.01, seed=1)
    target = plane.store.publish(target_state)
    ladder = ("rank=8,quant=4,targets=*,min-ndim=1", "rank=1,quant=4,targets=*,min-ndim=1")
    template = plane.store.get(target)
    assert template is not None
    probe = LadderPolicy(plane.store, ADAPTIVE_DOWN_LADDER, ladder)
    sizes = probe._up_sizes(ladder[0], parse_spec(ladder[0]), template)
    assert sizes.floor < sizes.expected < sizes.bound
    up = (sizes.expected + sizes.bound) // 2  # the bound does not fit, the expectation does
    policy = LadderPolicy(plane.store, ADAPTIVE_DOWN_LADDER, ladder, budget=Budget(0, up))
    choice = policy.choose(EdgeRequest(1, NODE, target, plane.init_digest))
    assert isinstance(choice, Choice) and choice.up_spec == ladder[0]
    assert choice.up_bytes == up
    # A full-rank update's factors barely compress: the edge lowers the rank to fit.
    for update in (_perturbed(target_state, 0.02, seed=2), _low_rank_update(target_state, 8, 3)):
        _, wire_up = plane.transfer(choice, target, update, None)
        assert wire_up <= up, (wire_up, up)
    # Below rank 1's bound the edge could not fit anything: skipped, with the reason.
    tight = LadderPolicy(
        plane.store, ADAPTIVE_DOWN_LADDER, ladder, budget=Budget(0, sizes.floor - 1)
    )
    skip = tight.choose(EdgeRequest(1, NODE, target, plane.init_digest))
    assert isinstance(skip, Skip) and "upload" in skip.reason


@pytest.mark.parametrize("down", [3_700, 2_500, 1_200])
def test_progressive_ladder_sizes_the_base_level_and_never_exceeds_the_budget(
    plane: Plane, down: int
) -> None:
    from coordinator.budget import DOWN_OVERHEAD_BYTES
    from simulations.baselines import PROGRESSIVE_DOWN_LADDER

    target = plane.store.publish(_perturbed(plane.init, 0.05, seed=1))
    request = EdgeRequest(1, NODE, target, plane.init_digest)
    policy = LadderPolicy(
        plane.store,
        PROGRESSIVE_DOWN_LADDER,
        ADAPTIVE_UP_LADDER,
        budget=Budget(down, 2_400),
        progressive=True,
    )
    choice = policy.choose(request)
    assert isinstance(choice, Choice)  # never a skip for the download
    i = PROGRESSIVE_DOWN_LADDER.index(choice.down_spec)
    assert 0 < choice.down_payload <= down - DOWN_OVERHEAD_BYTES
    wire_down, _ = plane.transfer(choice, target, _perturbed(plane.init, 0.02, seed=2), None)
    assert wire_down <= down, (choice, wire_down)
    # the densest rung whose base level fits: the rung before it would not have fitted
    sizes = policy._progressive_sizes  # (base level, segments) of a rung
    base, _ = sizes(request, parse_spec(choice.down_spec))
    if base > choice.down_payload:  # none fits: the sparsest, truncated
        assert i == len(PROGRESSIVE_DOWN_LADDER) - 1
    if i > 0:
        above, framing = sizes(request, parse_spec(PROGRESSIVE_DOWN_LADDER[i - 1]))
        assert above > down - DOWN_OVERHEAD_BYTES - framing


@pytest.mark.parametrize("progressive", [False, True])
def test_edges_holding_the_same_version_share_the_trial_encodes(
    plane: Plane, monkeypatch: pytest.MonkeyPatch, progressive: bool
) -> None:
    """Trial encodes are a function of (target, held, spec): edges that hold the same
    version get the same choice from the first edge's encodes, one that holds another
    version gets its own (and the same choice a fresh policy would make)."""
    import coordinator.budget as budget_module
    from simulations.baselines import PROGRESSIVE_DOWN_LADDER

    target = plane.store.publish(_perturbed(plane.init, 0.05, seed=1))
    other = plane.store.publish(_perturbed(plane.init, 0.04, seed=5), track=None)
    ladder = PROGRESSIVE_DOWN_LADDER if progressive else ADAPTIVE_DOWN_LADDER

    def policy() -> LadderPolicy:
        return LadderPolicy(
            plane.store,
            ladder,
            ADAPTIVE_UP_LADDER,
            budget=Budget(3_000, 2_400),
            progressive=progressive,
        )

    shared = policy()
    first = shared.choose(EdgeRequest(1, 1, target, plane.init_digest))
    encodes: list[int] = []
    from fedsqueeze.codec import encode_state as real

    def counted(*args: object, **kwargs: object) -> object:
        encodes.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(budget_module, "encode_state", counted)
    for node in (2, 3, 4):
        assert shared.choose(EdgeRequest(1, node, target, plane.init_digest)) == first
    assert not encodes  # every size came from the first edge's encodes
    elsewhere = shared.choose(EdgeRequest(1, 5, target, other))
    assert encodes  # another held version: its own trial encodes
    assert elsewhere == policy().choose(EdgeRequest(1, 5, target, other))


def test_an_upload_bound_counts_no_positions_for_frozen_tensors() -> None:
    from coordinator.budget import _upload_bound

    state = dict(get_task("digits-cnn").build_model(0).state_dict())
    frozen = max(state, key=lambda k: state[k].numel())
    spec = parse_spec(f"topk=0.1,quant=2:kmeans,targets=*,min-ndim=1,freeze={frozen}")
    free = parse_spec("topk=0.1,quant=2:kmeans,targets=*,min-ndim=1")
    sent = {k: v for k, v in state.items() if k != frozen}
    # What travels bounds it: the frozen tensor adds neither positions nor a record (the
    # spec's header names the pattern: a few bytes more).
    assert _upload_bound(free, sent) <= _upload_bound(spec, state) <= _upload_bound(free, sent) + 64
    assert _upload_bound(spec, state) + state[frozen].numel() // 80 < _upload_bound(free, state)
