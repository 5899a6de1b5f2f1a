"""The student track: a compact model federated beside the global one, for weak edges.

Edges whose link or byte budget cannot carry the global (teacher) model train the task's
student architecture instead (:class:`StudentAssignment`). The student is a track of its
own in the version store (:data:`STUDENT_TRACK`), travels on the same data plane and
codec, and is federated on its own: student updates are averaged into the student, never
into the teacher (:meth:`StudentTrack.aggregate`). Every ``refresh_every`` rounds the
coordinator distils the teacher into the student on its proxy set
(:meth:`StudentTrack.refresh`, :func:`coordinator.distill.distill`), starting from the
federated student, so what the weak edges learned is kept and the teacher's knowledge
flows in.

Assignment is sticky: an edge keeps the track it was first given, so its held model and
error-feedback residual stay of one architecture.

**The teacher learns from the students** (:class:`TeacherLearning`, run config
``student-to-teacher-epochs``, 0: off). Without it the weak edges' data never reaches the
teacher: the teacher is trained by the strong edges alone. With it, every round in which
both tracks took updates, the coordinator distils on its unlabelled proxy set, starting
from the averaged teacher ``T``, towards a target that adds what the students learned
(:meth:`StudentTrack.teach`, in the manner of FedKD / FedGKT: knowledge crosses between
architectures as logits, never as weights). Two targets
(:class:`fedsqueeze.runconfig.StudentToTeacher`):

- ``update`` (the default): ``T(x) + w · r · (S₁(x) − S₀(x))``, where ``S₀`` is the student
  the round's student edges started from and ``S₁`` their aggregate, so ``S₁ − S₀`` is the
  change the weak edges' data made to the student's outputs. ``w`` is the student edges'
  share of the round's examples (FedAvg's weight for them, had they trained the teacher)
  and ``r = lr / student-lr`` scales a step taken at the student's smaller learning rate to
  one at the teacher's (first order: a small SGD step moves outputs in proportion to the
  learning rate). The student's own quality, below the teacher's, does not pull the teacher
  down: only its movement counts. When the students did not move (``S₁ = S₀``) the
  teacher comes back unchanged, without a distillation step.
- ``ensemble``: the example-weighted average of ``T``'s and ``S₁``'s logits (FedDF's
  ensemble, across the two architectures). When the student equals the teacher in
  function the target is ``T`` itself: the loss and its gradient start at zero up to
  rounding, and with SGD the teacher moves by rounding-sized steps only (the tests bound it
  at 1e-5 per weight); unlike ``update`` there is no exact no-change test across two
  architectures.

The teacher learns with its own edges' optimizer and learning rate (SGD with momentum at
``lr`` in the sweeps), not the refresh's Adam: a target a little off the teacher must give a
little step. Adam normalises its steps, so near-zero gradients still move every weight by
about its learning rate; in the sweep that held the teacher at 0.10 accuracy through round 8
(both targets, seeds 0 and 1) where without teacher learning it was at 0.35.

After the teacher has learned, a due refresh distils the new teacher into the student as
before, so knowledge goes both ways every round.

Measured in the default sweep (BENCHMARKS.md) it does not help yet: with 2 epochs the
``update`` target drove the teacher to chance accuracy from round 13 on seeds 0 and 2, so it
is off by default (``epochs = 0``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from torch import Tensor, nn

from coordinator.averaging import average_states
from coordinator.distill import DistillConfig, TeacherFn, distill, ensemble, logits_of, shifted
from coordinator.version_store import VersionStore
from fedsqueeze.codec import state_digest
from fedsqueeze.control import ModelTrack
from fedsqueeze.recipes.deep_compression import states_equal
from fedsqueeze.runconfig import StudentToTeacher
from fedsqueeze.tasks import Optimizer, Task
from fedsqueeze.transport.shaping import LinkDirection, LinkProfile

__all__ = [
    "STUDENT_TRACK",
    "StudentAssignment",
    "StudentTrack",
    "TeacherLearning",
    "WeakLink",
]

log = logging.getLogger(__name__)

State = dict[str, Tensor]

STUDENT_TRACK = "student"
"""The version store's track of the student (beside ``"global"``)."""


@dataclass(frozen=True)
class WeakLink:
    """A link too weak for the teacher: slow in either direction, or a long round trip.

    The defaults pick 2g (0.2/0.1 Mbit/s), iot-lpwan (0.05/0.02 Mbit/s, 1.5 s) and
    satellite (650 ms RTT) among the simulations' profiles, and none of 3g, 4g, wifi.

    Attributes
    ----------
    max_down_mbit, max_up_mbit
        A link at or below either bandwidth (Mbit/s) is weak.
    min_rtt_ms
        A link with at least this round-trip time (ms) is weak.
    """

    max_down_mbit: float = 1.0
    max_up_mbit: float = 0.5
    min_rtt_ms: float = 500.0

    def __call__(self, link: LinkProfile) -> bool:
        """Whether ``link`` is weak."""
        down = link.bytes_per_s(LinkDirection.DOWN) * 8 / 1e6
        up = link.bytes_per_s(LinkDirection.UP) * 8 / 1e6
        return (
            down <= self.max_down_mbit
            or up <= self.max_up_mbit
            or link.rtt_s * 1000 >= self.min_rtt_ms
        )


class StudentAssignment:
    """Which track each edge trains: the student for weak links and low budgets.

    Parameters
    ----------
    link_of
        ``node_id -> LinkProfile`` (``None`` when unknown).
    weak_link
        Whether a link is too weak for the teacher (default :class:`WeakLink`).
    budget_of
        ``node_id ->`` the edge's per-round download budget in bytes (0: none).
    student_budget
        Edges with a budget at or below this many bytes (and above 0) get the student;
        0: budgets decide nothing.
    """

    def __init__(
        self,
        *,
        link_of: Callable[[int], LinkProfile | None] | None = None,
        weak_link: Callable[[LinkProfile], bool] = WeakLink(),
        budget_of: Callable[[int], int] | None = None,
        student_budget: int = 0,
    ) -> None:
        if student_budget < 0:
            raise ValueError(f"student_budget must be >= 0, got {student_budget}")
        self.link_of = link_of
        self.weak_link = weak_link
        self.budget_of = budget_of
        self.student_budget = student_budget
        self._tracks: dict[int, ModelTrack] = {}
        self._lock = threading.Lock()

    def track_of(self, node_id: int) -> ModelTrack:
        """The edge's track (decided on first contact, then kept)."""
        with self._lock:
            track = self._tracks.get(node_id)
            if track is None:
                track = self._decide(node_id)
                if track is not None:
                    self._tracks[node_id] = track
            return track or ModelTrack.GLOBAL

    def _decide(self, node_id: int) -> ModelTrack | None:
        link = self.link_of(node_id) if self.link_of is not None else None
        if link is not None and self.weak_link(link):
            return ModelTrack.STUDENT
        if self.budget_of is not None and self.student_budget:
            budget = self.budget_of(node_id)
            if 0 < budget <= self.student_budget:
                return ModelTrack.STUDENT
        if self.link_of is not None and link is None:
            return None  # not known yet (a simulation before discovery): decide later
        return ModelTrack.GLOBAL


@dataclass(frozen=True)
class TeacherLearning:
    """How the teacher learns from the student track (see the module docstring).

    Attributes
    ----------
    epochs
        Distillation epochs over the proxy set each round, ``>= 0`` (0: off).
    target
        What the teacher is distilled towards.
    step_ratio
        ``r``: the teacher edges' learning rate over the student edges' (``> 0``); scales
        the students' change in the ``update`` target.
    optimizer, lr
        How the teacher is trained towards the target: its edges' optimizer and learning
        rate (``lr > 0``).
    """

    epochs: int = 0
    target: StudentToTeacher = StudentToTeacher.UPDATE
    step_ratio: float = 1.0
    optimizer: Optimizer = Optimizer.SGD
    lr: float = 0.05

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int):
            raise TypeError(f"epochs must be an int, got {self.epochs!r}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0 (0: off), got {self.epochs}")
        if not isinstance(self.target, StudentToTeacher):
            raise TypeError(f"target must be a StudentToTeacher, got {self.target!r}")
        if not self.step_ratio > 0:
            raise ValueError(f"step_ratio must be > 0, got {self.step_ratio}")
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(f"optimizer must be an Optimizer, got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    @property
    def on(self) -> bool:
        """Whether the teacher learns from the students at all."""
        return self.epochs > 0


#: ``(states, weights, build) -> state``: how a track's client models are aggregated.
Aggregator = Callable[
    [Sequence[Mapping[str, Tensor]], Sequence[float], Callable[[], nn.Module]], State
]


def _mean(
    states: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    build: Callable[[], nn.Module],
) -> State:
    return average_states(states, weights)


class StudentTrack:
    """The student's state, versions, aggregation and refreshes.

    Parameters
    ----------
    store
        Where the student's versions go (track :data:`STUDENT_TRACK`).
    task
        Has the student (``build_student``) and teacher (``build_model``) builders.
    seed
        Seeds the initial student (edges rebuild it from the same seed).
    proxy_x
        The coordinator's proxy inputs ``[N, ...]`` (:func:`fedsqueeze.tasks.proxy.split_proxy`).
    distill_config
        How a refresh distils.
    refresh_every
        Refresh after every ``refresh_every``-th round (by the run's round number), >= 1.
    assignment
        Which edges train the student.
    resume
        Start from the track's head in ``store`` when there is one.
    aggregate
        How student updates are combined (weighted mean by default; FedDF fusion with
        ``aggregation = feddf``).
    from_teacher
        ``False``: never refresh from the teacher; the student is federated alone (the
        baseline a distilled student must beat).
    teacher_learning
        Whether and how the teacher learns from the students (:meth:`teach`); off by
        default.
    """

    def __init__(
        self,
        store: VersionStore,
        task: Task,
        seed: int,
        proxy_x: Tensor,
        distill_config: DistillConfig,
        refresh_every: int,
        assignment: StudentAssignment,
        *,
        resume: bool = False,
        aggregate: Aggregator = _mean,
        from_teacher: bool = True,
        teacher_learning: TeacherLearning = TeacherLearning(),
    ) -> None:
        if task.build_student is None:
            raise ValueError(f"task {task.name!r} has no student architecture")
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        self.store = store
        self.task = task
        self.seed = seed
        self.proxy_x = proxy_x
        self.distill_config = distill_config
        self.refresh_every = refresh_every
        self.assignment = assignment
        self.from_teacher = from_teacher
        self.teacher_learning = teacher_learning
        self._aggregate = aggregate
        self._build_student = task.build_student
        initial = {k: v.detach().clone() for k, v in self._build_student(seed).state_dict().items()}
        self.init_digest = state_digest(initial).hex()
        if not store.has(self.init_digest):
            store.publish(initial, track=None)
        head = store.head(STUDENT_TRACK) if resume else None
        resumed = store.get(head) if head is not None else None
        self.state: State = dict(resumed) if resumed is not None else initial
        self.refreshes = 0
        self.lessons = 0

    def track_of(self, node_id: int) -> ModelTrack:
        """The edge's track."""
        return self.assignment.track_of(node_id)

    def publish(self) -> str:
        """Publish the current student on its track; its digest."""
        return self.store.publish(self.state, track=STUDENT_TRACK)

    def model(self) -> nn.Module:
        """The current student as a module (eval mode)."""
        module = self._build_student(self.seed)
        module.load_state_dict(self.state)
        return module.eval()

    def aggregate(self, models: Sequence[tuple[Mapping[str, Tensor], float]]) -> bool:
        """Combine the round's student models into the student; ``False`` if none came."""
        if not models:
            return False
        states = [m for m, _ in models]
        weights = [max(w, 0.0) for _, w in models]
        if sum(weights) <= 0:
            weights = [1.0] * len(states)
        self.state = self._aggregate(states, weights, lambda: self._build_student(self.seed))
        return True

    def due(self, server_round: int) -> bool:
        """Whether the student is refreshed after ``server_round`` (the run's numbering)."""
        return self.from_teacher and server_round % self.refresh_every == 0

    def refresh(self, teacher_state: Mapping[str, Tensor]) -> float:
        """Distil the teacher into the current student on the proxy set; the last loss."""
        teacher = self.task.build_model(self.seed)
        teacher.load_state_dict(dict(teacher_state))
        result = distill(self.model(), logits_of(teacher.eval()), self.proxy_x, self.distill_config)
        self.state = {k: v.detach().clone() for k, v in result.student.state_dict().items()}
        self.refreshes += 1
        log.info(
            "student refreshed from the teacher (%d proxy inputs, %d epochs): loss %.4f, %.1f s",
            int(self.proxy_x.shape[0]),
            self.distill_config.epochs,
            result.loss,
            result.seconds,
        )
        return result.loss

    def teach(
        self,
        teacher_state: Mapping[str, Tensor],
        student_before: Mapping[str, Tensor],
        teacher_examples: float,
        student_examples: float,
    ) -> State | None:
        """The teacher after learning from this round's students; ``None``: unchanged.

        Parameters
        ----------
        teacher_state
            The round's averaged teacher (the distillation starts from it).
        student_before
            The student the round's student edges started from (``S₀``); the current
            :attr:`state` is their aggregate (``S₁``).
        teacher_examples, student_examples
            The examples behind each track's aggregate this round, ``>= 0``.

        Returns
        -------
        State or None
            ``None`` when teacher learning is off, no student examples came, or (``update``
            target) the students did not move.
        """
        learning = self.teacher_learning
        if min(teacher_examples, student_examples) < 0:
            raise ValueError(
                f"example counts must be >= 0, got {teacher_examples} and {student_examples}"
            )
        if not learning.on or student_examples <= 0:
            return None
        share = student_examples / (teacher_examples + student_examples)
        teacher = self.task.build_model(self.seed)
        teacher.load_state_dict(dict(teacher_state))
        teacher.eval()
        after = self.model()
        target: TeacherFn
        if learning.target is StudentToTeacher.UPDATE:
            if states_equal(dict(student_before), self.state):
                return None  # nothing moved: nothing to learn (Adam would step on noise)
            before = self._build_student(self.seed)
            before.load_state_dict(dict(student_before))
            target = shifted(
                logits_of(teacher),
                logits_of(after),
                logits_of(before.eval()),
                share * learning.step_ratio,
            )
        else:
            target = ensemble([teacher, after], [1.0 - share, share])
        config = replace(
            self.distill_config,
            epochs=learning.epochs,
            optimizer=learning.optimizer,
            lr=learning.lr,
        )
        result = distill(teacher, target, self.proxy_x, config)
        self.lessons += 1
        log.info(
            "teacher learned from the students (%s target, student share %.2f, %d epochs): "
            "loss %.4f, %.1f s",
            learning.target.value,
            share,
            learning.epochs,
            result.loss,
            result.seconds,
        )
        return {k: v.detach().clone() for k, v in result.student.state_dict().items()}
