"""Progressive fetches on the wire: truncation to a budget, prefixes that decode, later
fetches that send only what is missing, and an unchanged model for the manifest alone."""

from __future__ import annotations

import pytest
import torch

from fedsqueeze.codec import (
    CodecSpec,
    PruneMethod,
    PruneSpec,
    QuantSpec,
    encode_state,
    state_digest,
)
from fedsqueeze.codec.container import SUPPORTED_VERSIONS
from fedsqueeze.codec.spec import Granularity
from fedsqueeze.errors import CodecError, ResourceExhaustedError
from fedsqueeze.transport import GRPC_PREFIX_BYTES
from fedsqueeze.transport.client import decode_fetched_prefix
from fedsqueeze.transport.fetch import FetchState
from fedsqueeze.transport.truncate import plan_prefix
from fedsqueeze.wire.convert import fetch_manifest_message
from fedsqueeze.wire.types import Manifest, ManifestRequest, SegmentInfo
from tests.transport.conftest import make_state, perturb

pytestmark = pytest.mark.timeout(120)

SPEC = CodecSpec(
    quant=QuantSpec(8, granularity=Granularity.PER_CHANNEL), targets=("*weight",), levels=(2, 2, 4)
)


def _payload(result) -> int:  # type: ignore[no-untyped-def]
    return sum(result.manifest.segment(i).byte_length for i in range(len(result.manifest.segments)))


def test_progressive_streams_are_cut_at_record_boundaries(source, store, start_server, connect):
    source.publish(make_state(0))
    server = start_server(source, store)
    manifest = connect(server).get_manifest(ManifestRequest("global", None, SPEC))
    assert 3 <= len(manifest.segments) <= 12
    assert [s.segment_id for s in manifest.segments] == list(range(len(manifest.segments)))
    # base-level segments first; a refinement segment's level is its records' highest
    levels = [s.level for s in manifest.segments]
    first = levels.index(next(level for level in levels if level > 0))
    assert set(levels[:first]) == {0} and min(levels[first:]) >= 1 and max(levels) == 2
    assert 0 < manifest.smallest_prefix_bytes < manifest.encoded_bytes


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_budget_truncates_to_a_prefix_that_decodes(source, store, start_server, connect, fraction):
    state = make_state(0)
    source.publish(state)
    server = start_server(source, store)
    client = connect(server)
    whole = client.get_manifest(ManifestRequest("global", None, SPEC))
    budget = int(whole.encoded_bytes * fraction)
    result = client.fetch(spec=SPEC, byte_budget=budget)
    assert result.manifest.truncated and result.prefix is not None
    prefix_bytes = result.manifest.wanted_bytes
    assert whole.smallest_prefix_bytes <= prefix_bytes <= budget
    # The longest prefix: the next segment would not have fitted.
    assert prefix_bytes + result.manifest.segments[result.manifest.prefix_segments].byte_length > (
        budget
    )
    # Counted on the wire: the segments sent never exceed the budget.
    sent = result.stats.wire.received - len(fetch_manifest_message(result.manifest, _req(budget)))
    assert prefix_bytes <= sent - GRPC_PREFIX_BYTES * (result.stats.wire.messages_received)
    assert result.state is not None and state_digest(result.state) == result.digest
    # The server keeps what the edge decoded, so it can be the next delta's base.
    assert source.get(result.digest.hex()) is not None
    full = client.fetch(spec=SPEC)
    assert full.state is not None
    err_prefix = sum(float((result.state[k] - state[k]).square().sum()) for k in state)
    err_full = sum(float((full.state[k] - state[k]).square().sum()) for k in state)
    assert err_full <= err_prefix


def _req(budget: int | None) -> ManifestRequest:
    return ManifestRequest("global", None, SPEC, budget)


def test_budget_below_the_smallest_prefix_is_refused(source, store, start_server, connect):
    source.publish(make_state(0))
    server = start_server(source, store)
    client = connect(server)
    whole = client.get_manifest(_req(None))
    with pytest.raises(ResourceExhaustedError, match="smallest decodable prefix"):
        client.fetch(spec=SPEC, byte_budget=whole.smallest_prefix_bytes - 1)


def test_non_progressive_encodings_stay_all_or_nothing(source, store, start_server, connect):
    source.publish(make_state(0))
    server = start_server(source, store)
    with pytest.raises(ResourceExhaustedError):
        connect(server).fetch(spec=CodecSpec(quant=QuantSpec(8)), byte_budget=1000)


def test_later_fetch_sends_only_the_missing_refinements(source, store, start_server, connect):
    source.publish(make_state(0))
    server = start_server(source, store)
    client = connect(server)
    held = FetchState()
    whole = client.get_manifest(_req(None))
    sizes: list[int] = []
    for fraction in (0.3, 0.6, None):
        budget = None if fraction is None else int(whole.encoded_bytes * fraction)
        before = held.held_ids()
        result = client.fetch(spec=SPEC, byte_budget=budget, state=held)
        new = held.held_ids() - before
        sizes.append(sum(result.manifest.segment(i).byte_length for i in new))
        # On the wire: the manifest, then exactly the new segments' payloads and framing.
        segments = result.stats.wire.messages_received - 1
        assert segments == len(new)
    assert sum(sizes) == whole.encoded_bytes  # every byte once, none twice
    assert result.state is not None and result.prefix is None
    assert result.digest == whole.decoded_digest


def test_second_fetch_of_an_unchanged_model_costs_the_manifest_alone(
    source, store, start_server, connect
):
    old = make_state(0)
    source.publish(old)
    source.publish(perturb(old, seed=1))
    server = start_server(source, store)
    client = connect(server)
    held = FetchState()
    first = client.fetch(spec=SPEC, base=old, state=held)
    second = client.fetch(spec=SPEC, base=old, state=held)
    manifest_bytes = len(
        fetch_manifest_message(second.manifest, ManifestRequest("global", state_digest(old), SPEC))
    )
    assert second.stats.wire.messages_received == 1
    assert second.stats.wire.received == manifest_bytes + GRPC_PREFIX_BYTES
    assert second.digest == first.digest
    assert second.state is not None and first.state is not None
    assert all(torch.equal(second.state[k], first.state[k]) for k in first.state)


def test_next_delta_is_made_from_the_coarse_model_the_edge_holds(
    source, store, start_server, connect
):
    old = make_state(0)
    source.publish(old)
    server = start_server(source, store)
    client = connect(server)
    whole = client.get_manifest(_req(None))
    coarse = client.fetch(spec=SPEC, byte_budget=whole.encoded_bytes // 2)
    assert coarse.state is not None
    new = perturb(old, seed=2)
    digest = source.publish(new)
    nxt = client.fetch(spec=SPEC, base=coarse.state, byte_budget=whole.encoded_bytes // 2)
    assert nxt.manifest.base_digest == coarse.digest  # a delta, not the full model
    assert nxt.manifest.model_digest.hex() == digest
    assert nxt.state is not None


def test_plan_prefix_never_exceeds_the_budget() -> None:
    infos = tuple(SegmentInfo(i, (), i, i // 3, 100 + 37 * i, b"\0" * 32) for i in range(9))
    manifest = Manifest(b"k" * 16, b"\1" * 32, None, SPEC, 10_000, b"\2" * 32, infos, 0, 150)
    for budget in range(137, 2_000, 53):
        for held in (frozenset(), frozenset({0, 1})):
            try:
                prefix = plan_prefix(manifest, held, budget)
            except ResourceExhaustedError:
                assert sum(i.byte_length for i in infos[:2]) > 150 or not held
                continue
            count = prefix or len(infos)
            sent = sum(i.byte_length for i in infos[:count] if i.segment_id not in held)
            assert sent <= budget


def test_hostile_prefixes_raise_codec_errors() -> None:
    state = make_state(0)
    encoded = encode_state(state, SPEC)
    stream = encoded.to_bytes()[:-4]
    manifest = Manifest(
        b"k" * 16,
        b"\1" * 32,
        None,
        SPEC,
        1,
        b"\2" * 32,
        (SegmentInfo(0, (), 0, 0, len(stream), b"\0" * 32),),
    )
    header = len(encoded.header.to_bytes())
    records = [r.to_bytes() for r in encoded.records]
    bases = encoded.base_records
    hostile = [
        stream[:header],  # a full model without its base levels
        stream[: header + 3],
        stream[:header] + records[bases] + b"".join(records[:bases]),  # refinement first
        stream[:header] + b"".join(records[:bases]) + records[-1],  # level skipped
        b"FSQ" + bytes([max(SUPPORTED_VERSIONS) + 1]) + stream[4:],  # unknown version
        stream[:header] + bytes(200),
        bytes(64),
    ]
    for data in hostile:
        with pytest.raises(CodecError):
            decode_fetched_prefix(data, manifest, None)


#: Positions in groups (support levels, format version 6).
GROWN = CodecSpec(
    prune=PruneSpec(PruneMethod.L1_GLOBAL, 0.7),
    quant=QuantSpec(4),
    targets=("*weight",),
    levels=(1, 1, 2),
    grow=(0.9, 0.8),
)


def test_support_level_streams_truncate_and_resume_without_a_byte_twice(
    source, store, start_server, connect
):
    state = make_state(0)
    source.publish(state)
    server = start_server(source, store)
    client = connect(server)
    held = FetchState()
    whole = client.get_manifest(ManifestRequest("global", None, GROWN))
    assert 0 < whole.smallest_prefix_bytes < whole.encoded_bytes
    sizes: list[int] = []
    errors: list[float] = []
    for fraction in (0.3, 0.3, None):  # a budget counts the bytes a fetch sends
        budget = None if fraction is None else int(whole.encoded_bytes * fraction)
        before = held.held_ids()
        result = client.fetch(spec=GROWN, byte_budget=budget, state=held)
        new = held.held_ids() - before
        sizes.append(sum(result.manifest.segment(i).byte_length for i in new))
        assert budget is None or sizes[-1] <= budget
        assert result.state is not None
        errors.append(sum(float((result.state[k] - state[k]).square().sum()) for k in state))
    assert sum(sizes) == whole.encoded_bytes
    assert result.digest == whole.decoded_digest
    assert errors[-1] <= errors[0]
