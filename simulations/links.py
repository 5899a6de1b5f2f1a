"""Named link profiles and mixes of them across simulated clients.

The profiles are typical figures for each kind of access network (what an application
sees after protocol overheads), not measurements; pass your own in a config when you
have them. Bandwidths are megabits per second (10^6 bits), RTTs milliseconds.

=============  ==========  ==========  ========  =============================================
name           down Mbit/s up Mbit/s   RTT ms    what it stands for
=============  ==========  ==========  ========  =============================================
``2g``         0.20        0.10        600       GSM/EDGE, a weak rural cell
``3g``         3.0         1.0         150       HSPA
``4g``         20          8.0         50        LTE, a typical urban cell
``wifi``       50          20          10        home or office Wi-Fi behind a broadband line
``satellite``  10          2.0         650       geostationary satellite broadband
``iot-lpwan``  0.05        0.02        1500      NB-IoT / LTE-M class low-power WAN
=============  ==========  ==========  ========  =============================================

A :class:`LinkMix` gives each profile a share of the clients (``"4g:0.4,3g:0.3,2g:0.3"``);
:func:`assign_links` turns it into one profile per client, the same for the same seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedsqueeze.errors import ConfigError
from fedsqueeze.transport.shaping import LinkProfile

__all__ = ["LINK_PROFILES", "MIXES", "LinkMix", "assign_links", "link_profile", "parse_mix"]

LINK_PROFILES: Mapping[str, LinkProfile] = {
    "2g": LinkProfile.from_mbit(0.20, 0.10, 600),
    "3g": LinkProfile.from_mbit(3.0, 1.0, 150),
    "4g": LinkProfile.from_mbit(20.0, 8.0, 50),
    "wifi": LinkProfile.from_mbit(50.0, 20.0, 10),
    "satellite": LinkProfile.from_mbit(10.0, 2.0, 650),
    "iot-lpwan": LinkProfile.from_mbit(0.05, 0.02, 1500),
}
"""The built-in profiles by name (see the module docstring for what they stand for)."""


def link_profile(name: str) -> LinkProfile:
    """The built-in profile ``name``; :class:`ConfigError` lists the known ones."""
    try:
        return LINK_PROFILES[name]
    except KeyError:
        raise ConfigError(
            f"unknown link profile {name!r}; profiles: {', '.join(LINK_PROFILES)}"
        ) from None


@dataclass(frozen=True)
class LinkMix:
    """Shares of clients per named profile.

    Parameters
    ----------
    shares
        ``(profile name, share)`` pairs; shares are positive and are normalized, so
        ``4g:2,3g:1`` means two thirds on 4G.
    """

    shares: tuple[tuple[str, float], ...]

    def __post_init__(self) -> None:
        if not self.shares:
            raise ConfigError("a link mix needs at least one profile")
        names = [name for name, _ in self.shares]
        if len(set(names)) != len(names):
            raise ConfigError(f"link mix names a profile twice: {names}")
        for name, share in self.shares:
            link_profile(name)
            if not share > 0:
                raise ConfigError(f"link mix share of {name!r} must be > 0, got {share}")

    def text(self) -> str:
        """The text form, ``name:share,...``."""
        return ",".join(f"{name}:{share:g}" for name, share in self.shares)


MIXES: Mapping[str, LinkMix] = {
    "mixed": LinkMix(
        (
            ("4g", 0.30),
            ("3g", 0.25),
            ("wifi", 0.20),
            ("2g", 0.10),
            ("satellite", 0.10),
            ("iot-lpwan", 0.05),
        )
    ),
    "mobile": LinkMix((("4g", 0.5), ("3g", 0.3), ("2g", 0.2))),
    **{name: LinkMix(((name, 1.0),)) for name in LINK_PROFILES},
}
"""Named mixes: ``mixed`` (the default sweep's), ``mobile``, and every profile alone."""


def parse_mix(text: str) -> LinkMix:
    """A named mix (``mixed``) or ``name:share,...`` (a bare name means share 1)."""
    text = text.strip()
    if text in MIXES:
        return MIXES[text]
    pairs: list[tuple[str, float]] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, share = part.partition(":")
        try:
            pairs.append((name.strip(), float(share) if sep else 1.0))
        except ValueError:
            raise ConfigError(f"link mix {part!r}: the share must be a number") from None
    return LinkMix(tuple(pairs))


def assign_links(mix: LinkMix, num_clients: int, seed: int) -> tuple[str, ...]:
    """One profile name per client (partition id order), the same for the same seed.

    Counts follow the shares by largest remainder (every share gets its exact quota,
    rounded), then a seeded shuffle decides which clients get which link, so links are
    independent of how the data was partitioned.
    """
    if num_clients < 1:
        raise ValueError("num_clients must be >= 1")
    total = sum(share for _, share in mix.shares)
    quotas = [share / total * num_clients for _, share in mix.shares]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: num_clients - sum(counts)]:
        counts[i] += 1
    names = [
        name for (name, _), count in zip(mix.shares, counts, strict=True) for _ in range(count)
    ]
    order = np.random.default_rng([seed, 0x11_4B]).permutation(num_clients)
    return tuple(names[i] for i in order)
