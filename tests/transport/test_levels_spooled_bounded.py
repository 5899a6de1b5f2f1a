"""Progressive (``levels``) encodings of large models are spooled like the others: the
same segments, levels and manifest as the in-memory path, truncated by a byte budget to
the same prefixes (threshold lowered to 1 MiB here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsqueeze.codec import encode_state, split_progressive
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.transport import ServerConfig
from fedsqueeze.transport.spool import SpoolPolicy, plan_progressive
from tests.transport.conftest import make_state, perturb

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
LEVELS = ("quant=8:channel,levels=2+2+4", "quant=8:channel:hadamard,levels=2+1+1+1+1+2")


def _config(folder: Path | None) -> ServerConfig:
    if folder is None:
        return ServerConfig(segment_bytes=256 * 1024, spool=None)
    folder.mkdir(exist_ok=True)
    spool = SpoolPolicy(threshold_bytes=MIB, directory=folder)
    return ServerConfig(segment_bytes=256 * 1024, spool=spool)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("text", LEVELS)
def test_planned_progressive_cuts_are_those_of_split_progressive(text):
    state = make_state(0, scale=2)
    for base in (None, perturb(state, 1)):
        encoded = encode_state(state if base is None else perturb(state, 2), parse_spec(text), base)
        lengths = [(None, 0, len(encoded.header.to_bytes()))] + [
            (r.name, r.level, len(r.to_bytes())) for r in encoded.records
        ]
        for target, size in ((64, 64), (300, 1000), (4096, 128 * 1024), (1 << 20, 1 << 20)):
            planned = plan_progressive(lengths, target, size)
            actual = split_progressive(encoded, target, size)
            assert [(p.end - p.start, p.tensor_names, p.level) for p in planned] == [
                (len(s.payload), s.tensor_names, s.level) for s in actual
            ]


@pytest.mark.parametrize("text", LEVELS)
def test_spooled_levels_equal_the_in_memory_path(
    text, source, store, start_server, connect, tmp_path
):
    state = make_state(0, scale=4)  # about 4.4 MB
    first = source.publish(state)
    spec = parse_spec(text)
    memory = start_server(source, store, config=_config(None))
    spooled = start_server(source, store, config=_config(tmp_path / "srv"))
    a, b = connect(memory).fetch(spec=spec), connect(spooled).fetch(spec=spec)
    assert a.manifest == b.manifest and a.manifest.smallest_prefix_bytes > 0
    assert a.state is not None and b.state is not None and _equal(a.state, b.state)
    assert any(p.is_file() for p in (tmp_path / "srv").rglob("*"))  # served from disk
    # truncated by a budget: the same prefix, decoded to the same model and kept
    budget = a.manifest.encoded_bytes // 2
    a2 = connect(memory).fetch(spec=spec, byte_budget=budget)
    b2 = connect(spooled).fetch(spec=spec, byte_budget=budget)
    assert a2.prefix is not None and b2.prefix is not None
    assert a2.manifest.prefix_segments == b2.manifest.prefix_segments > 0
    assert a2.prefix == b2.prefix and a2.state is not None and b2.state is not None
    assert _equal(a2.state, b2.state) and source.get(b2.digest.hex()) is not None
    # a delta from a version the server holds
    source.publish(perturb(state, 3))
    held = state
    a3 = connect(memory).fetch(spec=spec, base=held)
    b3 = connect(spooled).fetch(spec=spec, base=held)
    assert a3.manifest == b3.manifest and a3.manifest.base_digest is not None
    assert a3.state is not None and b3.state is not None and _equal(a3.state, b3.state)
    assert first in source.versions()
