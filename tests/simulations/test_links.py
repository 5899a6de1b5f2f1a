"""Link profiles, mixes and their seeded assignment to clients."""

from __future__ import annotations

from collections import Counter

import pytest

from fedsqueeze.errors import ConfigError
from simulations.links import LINK_PROFILES, MIXES, LinkMix, assign_links, parse_mix


def test_profiles_are_the_documented_ones() -> None:
    assert set(LINK_PROFILES) == {"2g", "3g", "4g", "wifi", "satellite", "iot-lpwan"}
    assert LINK_PROFILES["4g"].down_bps == 20e6
    assert LINK_PROFILES["satellite"].rtt_s == pytest.approx(0.65)
    for p in LINK_PROFILES.values():
        assert p.down_bps >= p.up_bps > 0


def test_parse_mix_named_and_explicit() -> None:
    assert parse_mix("mixed") is MIXES["mixed"]
    assert parse_mix("4g:2, 3g:1").shares == (("4g", 2.0), ("3g", 1.0))
    assert parse_mix("wifi").shares == (("wifi", 1.0),)
    with pytest.raises(ConfigError, match="unknown link profile"):
        parse_mix("5g:1")
    with pytest.raises(ConfigError, match="must be a number"):
        parse_mix("4g:lots")
    with pytest.raises(ConfigError, match="twice"):
        LinkMix((("4g", 1.0), ("4g", 1.0)))


@pytest.mark.parametrize("n", [1, 7, 20, 1000])
def test_assignment_follows_the_shares_and_the_seed(n: int) -> None:
    mix = MIXES["mixed"]
    links = assign_links(mix, n, seed=3)
    assert len(links) == n
    assert links == assign_links(mix, n, seed=3)
    counts = Counter(links)
    total = sum(s for _, s in mix.shares)
    for name, share in mix.shares:
        assert abs(counts[name] - share / total * n) < 1.0


def test_assignment_changes_with_the_seed() -> None:
    a, b = assign_links(MIXES["mixed"], 40, 0), assign_links(MIXES["mixed"], 40, 1)
    assert a != b and Counter(a) == Counter(b)
