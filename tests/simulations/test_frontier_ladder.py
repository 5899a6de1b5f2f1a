"""The ``frontier`` arm's download ladder: low-rank factors of the delta an edge lacks.

Its reason to exist, checked on the kind of delta it is for: a global model that moved
by averages of a few clients' low-rank updates (what the adaptive uploads are) plus a
little noise. There the rank-4 rung costs fewer bytes than the adaptive ladder's
``prune=l1:0.9,quant=2:kmeans`` rung and leaves less of the delta unsent, and sizes fall
along the ladder (the policy's binary search relies on it).
"""

from __future__ import annotations

import torch

from fedsqueeze.codec.model import EncodedModel, decode_state, encode_state
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.tasks import get_task
from simulations.baselines import ADAPTIVE_DOWN_LADDER, FRONTIER_DOWN_LADDER

State = dict[str, torch.Tensor]


def _low_rank_moves(base: State, clients: int, rank: int, seed: int) -> State:
    """``base`` plus the average of ``clients`` rank-``rank`` steps per matrix (and a
    little dense noise everywhere)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, v in base.items():
        step = 1e-3 * torch.randn(v.shape, generator=g)
        if v.dim() >= 2:
            m, n = v.shape[0], v[0].numel()
            for _ in range(clients):
                a = torch.randn(m, rank, generator=g)
                b = torch.randn(rank, n, generator=g)
                step += 0.02 / clients * (a @ b).view(v.shape) / rank**0.5
        out[name] = v + step
    return out


def _sent(spec_text: str, target: State, held: State) -> tuple[int, float]:
    """Wire-format bytes of the delta and ``‖decoded − target‖ / ‖target − held‖``."""
    data = encode_state(target, parse_spec(spec_text), base=held).to_bytes()
    decoded = decode_state(EncodedModel.from_bytes(data), held)
    num = sum(float((decoded[k] - v).double().square().sum()) for k, v in target.items())
    den = sum(float((v - held[k]).double().square().sum()) for k, v in target.items())
    return len(data), (num / den) ** 0.5


def test_low_rank_rung_beats_the_pruned_rung_on_averaged_low_rank_moves() -> None:
    held = dict(get_task("digits-cnn").build_model(0).state_dict())
    target = _low_rank_moves(held, clients=3, rank=2, seed=1)
    pruned = next(s for s in ADAPTIVE_DOWN_LADDER if s.startswith("prune=l1:0.9,"))
    rank4 = next(s for s in FRONTIER_DOWN_LADDER if s.startswith("rank=4,"))
    pruned_bytes, pruned_err = _sent(pruned, target, held)
    rank_bytes, rank_err = _sent(rank4, target, held)
    assert rank_bytes < pruned_bytes, (rank_bytes, pruned_bytes)
    assert rank_err < pruned_err, (rank_err, pruned_err)


def test_sizes_fall_along_the_frontier_ladder() -> None:
    held = dict(get_task("digits-cnn").build_model(0).state_dict())
    target = _low_rank_moves(held, clients=10, rank=5, seed=2)
    sizes = [_sent(spec, target, held)[0] for spec in FRONTIER_DOWN_LADDER]
    assert sizes == sorted(sizes, reverse=True), sizes
    assert len(set(sizes)) == len(sizes)
