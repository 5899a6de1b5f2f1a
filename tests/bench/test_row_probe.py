"""The row probe's pieces (fedsqueeze.bench.row_probe): row weights and row plans."""

from __future__ import annotations

import pytest
import torch

from fedsqueeze.bench.gptq_probe import quantize_tensor
from fedsqueeze.bench.row_probe import row_plan_choice, row_weights


def test_row_weights_count_and_share_the_unseen_mass() -> None:
    w = row_weights([3, 3, 3, 1, 5], 8)
    assert w[3] == 3 and w[1] == 1 and w[5] == 1
    # Two tokens seen once: the five unseen rows share a mass of 2, evenly.
    unseen = torch.tensor([0, 2, 4, 6, 7])
    assert torch.allclose(w[unseen], torch.full((5,), 2 / 5, dtype=torch.float64))
    assert float(w.sum()) == pytest.approx(5 + 2)
    with pytest.raises(ValueError, match="no calibration tokens"):
        row_weights([], 8)
    with pytest.raises(ValueError, match="beyond the table's 4 rows"):
        row_weights([9], 4)
    # backed off: the same mass, shared by the prior's smoothed counts
    backed = row_weights([3, 3, 3, 1, 5], 8, prior_ids=[0, 0, 0, 2, 7])
    assert torch.equal(backed[[1, 3, 5]], w[[1, 3, 5]])
    assert float(backed[unseen].sum()) == pytest.approx(2.0)
    assert float(backed[0]) > float(backed[2]) == float(backed[7]) > float(backed[4])
    with pytest.raises(ValueError, match="beyond the table's 8 rows"):
        row_weights([3], 8, prior_ids=[8])


def test_a_row_plan_spends_its_bits_where_the_weights_are() -> None:
    g = torch.Generator().manual_seed(0)
    value = torch.randn(64, 384, generator=g)
    seen = torch.zeros(64, dtype=torch.bool)
    seen[:8] = True
    weights = torch.where(seen, 10.0, 0.1).to(torch.float64)
    plan = row_plan_choice(value, seen, 4, 1, weights, name="t.weight")
    low = quantize_tensor("t.weight", value, 1, None, False)
    high_rows = quantize_tensor("t.weight", value[:8], 4, None, False)
    assert plan.bits == 401
    assert plan.nbytes > low.nbytes  # the seen rows cost more
    assert plan.nbytes < quantize_tensor("t.weight", value, 4, None, False).nbytes
    # The seen rows are decoded at 4 bits (as alone), the rest at 1.
    assert torch.equal(plan.decoded[:8], high_rows.decoded)
    seen_err = (plan.decoded[:8] - value[:8]).square().sum()
    rest_err = (plan.decoded[8:] - value[8:]).square().sum() / 7  # per 8 rows
    assert seen_err < rest_err
    # Weighted: the plan's error is below every-row-at-1-bit's in the same currency.
    uniform = (low.decoded - value).square().sum(dim=1).to(torch.float64)
    assert plan.error < float((uniform * weights).sum() * 64 / weights.sum())


def test_row_weight_texts_never_hold_a_test_sentence() -> None:
    from fedsqueeze.bench.progressive import stdlib_sentences
    from fedsqueeze.bench.sensitivity import calibration_text, domain_text

    test = set(stdlib_sentences(limit=1 << 30))
    domain, calibration = domain_text(), calibration_text()
    assert len(domain) > 1000 and len(calibration) > 1000
    assert not test & set(domain) and not test & set(calibration)
    # the domain text is the test modules' other lines, not the calibration modules'
    assert len(set(domain) & set(calibration)) < len(domain) // 10


def test_an_unknown_row_weight_source_is_refused() -> None:
    from fedsqueeze.bench.row_probe import minilm_row_weights

    with pytest.raises(ValueError, match="unknown row-weight source 'tests'"):
        minilm_row_weights(source="tests")


def test_tier_costs_are_measured_on_held_out_lines() -> None:
    from fedsqueeze.bench.codec import minilm_sentence_model
    from fedsqueeze.bench.row_probe import minilm_tier_costs

    with pytest.raises(ValueError, match="unknown row-weight source 'tests'"):
        minilm_tier_costs(source="tests")
    if minilm_sentence_model() is None:
        pytest.skip("needs the bench extra (the MiniLM weights)")
    said: list[str] = []
    unread, fill = minilm_tier_costs(said.append, "calibration", sentences=128)
    # a row at the mean row costs more per unit than noise in it (8.2x on 512 lines)
    assert 0 < unread < 100 and fill > 1.0
    assert "128 odd lines" in said[0]
