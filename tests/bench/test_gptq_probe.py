"""The GPTQ probe on a tiny two-layer network (the MiniLM figures are in BENCHMARKS.md)."""

from __future__ import annotations

from functools import partial

import torch

from fedsqueeze.bench.gptq_probe import allocate, input_moments, quantize_tensor, run_probe
from fedsqueeze.bench.progressive import run


def _net() -> tuple[torch.nn.Sequential, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16, bias=False)
    )
    mix = torch.randn(32, 32)
    x = torch.randn(256, 32) @ mix  # correlated inputs: where GPTQ has something to use
    return net, x


def _probe(budgets: list[int]) -> list[dict[str, object]]:
    net, x = _net()
    calib, test = x[:128], x[128:]
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        reference = torch.nn.functional.normalize(net(test), dim=1)

    def cosine(s: dict[str, torch.Tensor]) -> float:
        net.load_state_dict(s)
        with torch.no_grad():
            y = torch.nn.functional.normalize(net(test), dim=1)
        return float((y * reference).sum(dim=1).mean())

    def moments_of(s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        net.load_state_dict(s)
        return input_moments(net, lambda: net(calib), torch.ones(calib.shape[0]))

    weights = {"0.weight": 1.0, "2.weight": 1.0}
    return run_probe(state, cosine, moments_of, weights, budgets, (1, 2, 3), out=lambda _: None)


def test_gptq_beats_nearest_at_equal_bits_and_budgets_hold() -> None:
    fp32 = 4 * (32 * 64 + 64 + 64 * 16)
    budgets = [fp32 // 12, fp32 // 8]
    rows = _probe(budgets)
    by = {(r["plan"], r["method"]): r for r in rows}
    rtn, gptq = by[("2 bits", "rtn")]["cosine"], by[("2 bits", "gptq")]["cosine"]
    assert isinstance(rtn, float) and isinstance(gptq, float)
    assert -1.0 <= rtn < gptq <= 1.0
    allocated = [r for r in rows if str(r["plan"]).startswith("allocated")]
    assert {r["method"] for r in allocated} == {"rtn", "gptq"}
    for r in allocated:
        limit = float(str(r["plan"]).split("<= ")[1].split(" MB")[0]) * 1e6
        assert float(str(r["bytes"])) <= limit + 5e3  # the label is rounded to 10 kB
    methods = {r["method"] for r in rows}
    assert "gptq-seq" in methods


def test_allocation_spends_more_bits_where_the_weight_is() -> None:
    net, x = _net()
    h = x.T.double() @ x.double()
    first = net[0]
    assert isinstance(first, torch.nn.Linear)
    w = first.weight.detach()
    options = {
        "a": [quantize_tensor("a", w, k, h, True) for k in (1, 2, 3, 4)],
        "b": [quantize_tensor("b", w, k, h, True) for k in (1, 2, 3, 4)],
    }
    budget = options["a"][1].nbytes + options["b"][1].nbytes
    chosen = allocate(options, {"a": 100.0, "b": 1.0}, budget)
    assert chosen is not None
    assert chosen["a"].bits > chosen["b"].bits
    assert sum(c.nbytes for c in chosen.values()) <= budget
    assert allocate(options, {"a": 1.0, "b": 1.0}, 1.0) is None


def test_the_part_is_opt_in_and_named() -> None:
    report = run(skip_minilm=True, parts=("gptq",))
    assert "minilm_gptq_probe" not in report


def test_row_counts_count_the_unmasked_ids_of_every_embedding() -> None:
    from fedsqueeze.bench.gptq_probe import row_counts

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.words = torch.nn.Embedding(10, 4)
            self.out = torch.nn.Linear(4, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            y: torch.Tensor = self.out(self.words(ids))
            return y

    net = Net()
    ids = torch.tensor([[1, 2, 2, 0], [3, 3, 3, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    counts = row_counts(net, lambda: net(ids), mask)
    assert set(counts) == {"words.weight"}
    want = torch.zeros(10, dtype=torch.float64)
    for i in (1, 2, 2, 3, 3):
        want[i] += 1
    assert torch.equal(counts["words.weight"], want)


def test_moments_summed_over_passes_are_those_of_one_pass() -> None:
    from fedsqueeze.bench.gptq_probe import summed_moments

    net, x = _net()
    whole = input_moments(net, lambda: net(x), torch.ones(x.shape[0]))
    chunks: list[torch.Tensor] = list(torch.split(x, 100))
    parts = summed_moments(net, ((partial(net, c), torch.ones(c.shape[0])) for c in chunks))
    assert set(parts) == set(whole) == {"0.weight", "2.weight"}
    for name, h in whole.items():
        torch.testing.assert_close(parts[name], h)
