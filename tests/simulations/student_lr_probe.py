"""Why the federated student collapsed: an offline replica of the ``distill`` arm's student.

``python -m tests.simulations.student_lr_probe`` (about 1 min of CPU per seed). Per seed
(0, 1, 2): the default sweep's data split (the coordinator's 360 proxy rows held out,
Dirichlet 0.5 over 20 clients), its weak-link clients (2g, iot-lpwan, satellite) and its
sampling (10 of 20 a round; the weak ones among them train the student). A teacher
trained centrally (3 epochs, lr 0.05) is distilled into the student on the proxy set as
the coordinator's refresh does; then

* the distilled student goes through 5 rounds of the weak clients' local training (2
  epochs of SGD, momentum 0.9, batch 32) and weighted averaging, no codec, at lr 0.1 (the
  sweep's), 0.03 and 0.01;
* a student from scratch goes through 30 such rounds (the ``student-fedavg`` baseline).

Test accuracy after each round. No codec and no refresh in the loop: what it shows comes
from the local training alone. Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from coordinator.averaging import average_states
from coordinator.distill import DistillConfig, distill, logits_of
from fedsqueeze.tasks import get_task, partition_dirichlet
from fedsqueeze.tasks.proxy import split_proxy
from fedsqueeze.tasks.training import evaluate, train
from simulations.baselines import WEAK_LINKS
from simulations.grid import sample_partitions
from simulations.links import assign_links, parse_mix

CLIENTS, PER_ROUND = 20, 10


def _federate(
    start: nn.Module, lr: float, rounds: int, seed: int, weak: set[int], parts: list[torch.Tensor]
) -> list[float]:
    """Test accuracy after each of ``rounds`` rounds of the weak clients' training."""
    data = get_task("digits-cnn").load_data()
    _, rest = split_proxy(data, 360)
    state = copy.deepcopy(start.state_dict())
    accuracies = []
    for rnd in range(1, rounds + 1):
        chosen = [p for p in sample_partitions(seed, rnd, CLIENTS, PER_ROUND) if p in weak]
        if chosen:
            states, weights = [], []
            for p in chosen:
                model = copy.deepcopy(start)
                model.load_state_dict(state)
                x, y = rest.x_train[parts[p]], rest.y_train[parts[p]]
                train(model, x, y, epochs=2, lr=lr, seed=seed + rnd)
                states.append(model.state_dict())
                weights.append(float(len(parts[p])))
            state = average_states(states, weights)
        model = copy.deepcopy(start)
        model.load_state_dict(state)
        accuracies.append(evaluate(model, data.x_test, data.y_test).accuracy)
    return accuracies


def main() -> None:
    torch.set_num_threads(1)
    task = get_task("digits-cnn")
    assert task.build_student is not None
    data = task.load_data()
    proxy, rest = split_proxy(data, 360)
    for seed in (0, 1, 2):
        parts = partition_dirichlet(rest.y_train, CLIENTS, 0.5, seed)
        links = assign_links(parse_mix("mixed"), CLIENTS, seed)
        weak = {i for i, name in enumerate(links) if name in WEAK_LINKS}
        teacher = task.build_model(seed)
        train(teacher, rest.x_train, rest.y_train, epochs=3, lr=0.05, seed=seed)
        student = distill(
            task.build_student(seed), logits_of(teacher), proxy.x, DistillConfig(seed=seed)
        ).student

        with torch.no_grad():
            spread = float(student(data.x_test).std())
        print(
            f"seed {seed}: weak clients {sorted(weak)}, distilled student "
            f"{evaluate(student, data.x_test, data.y_test).accuracy:.3f} "
            f"(logit std {spread:.1f})",
            flush=True,
        )
        for lr in (0.1, 0.03, 0.01):
            distilled = _federate(student, lr, 5, seed, weak, parts)
            scratch = _federate(task.build_student(seed), lr, 30, seed, weak, parts)
            print(
                f"  lr {lr}: distilled, then 5 weak rounds "
                f"{' '.join(f'{a:.3f}' for a in distilled)}; from scratch, 30 rounds: "
                f"final {scratch[-1]:.3f} best {max(scratch):.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
