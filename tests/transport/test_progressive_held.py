"""Progressive encodings with held parts: the edge holding some tensors exactly and a
coarse prefix of the rest gets only what it lacks, and decodes the expected model."""

from __future__ import annotations

import pytest
import torch

from fedsqueeze.codec import CodecSpec, QuantSpec, decode_prefix, encode_state, state_digest
from fedsqueeze.codec.spec import Granularity
from fedsqueeze.errors import HeldPartError
from fedsqueeze.transport import GRPC_PREFIX_BYTES, FetchResult, InMemoryModelSource
from fedsqueeze.transport.fetch import FetchState
from fedsqueeze.transport.parts import HeldVersions, part_digest
from fedsqueeze.transport.source import encode_seed, without
from fedsqueeze.wire.convert import fetch_manifest_message
from fedsqueeze.wire.types import ManifestRequest
from tests.transport.conftest import make_state, perturb

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def source() -> InMemoryModelSource:
    # Room for the prefixes the server keeps besides the three versions: v1 (held by the
    # edge, no track's head) must stay known, as the coordinator's store pins it.
    return InMemoryModelSource(keep=8)


SPEC = CodecSpec(
    quant=QuantSpec(8, granularity=Granularity.PER_CHANNEL), targets=("*weight",), levels=(2, 2, 4)
)
SHARED = "fc.weight"


def _versions(
    source: InMemoryModelSource,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """v0 (the edge's base), v1 (an older version it also holds) and the target v2, whose
    largest layer is v1's again."""
    g = torch.Generator().manual_seed(5)
    v0 = {**make_state(0), "out.weight": torch.randn(128, 1024, generator=g)}
    v1 = perturb(v0, seed=1)
    v2 = perturb(v0, seed=2)
    v2[SHARED] = v1[SHARED].clone()
    for v in (v1, v0, v2):
        source.publish(v)
    return v0, v1, v2


def _held(*states: dict[str, torch.Tensor]) -> HeldVersions:
    return HeldVersions.of({state_digest(s): s for s in states})


def _expected_prefix(
    v0: dict[str, torch.Tensor], v2: dict[str, torch.Tensor], prefix_bytes: int
) -> dict[str, torch.Tensor]:
    """What the first ``prefix_bytes`` of the stream of everything but the shared layer
    decode to, with the shared layer put in exactly: computed here, not by the server."""
    d0, d2 = state_digest(v0), state_digest(v2)
    encoded = encode_state(
        without(v2, frozenset({SHARED})),
        SPEC,
        v0,
        seed=encode_seed(d2.hex(), d0.hex(), SPEC),
        base_digest=d0,
    )
    stream = b"".join([encoded.header.to_bytes(), *(r.to_bytes() for r in encoded.records)])
    state = decode_prefix(stream[:prefix_bytes], v0, base_digest=d0).state
    state[SHARED] = v2[SHARED]
    return state


def _payload_received(result: FetchResult, budget: int | None, base: bytes) -> int:
    """Segment payload bytes received: the wire less the manifest and framing."""
    request = ManifestRequest("global", base, SPEC, budget, ())
    manifest = len(fetch_manifest_message(result.manifest, request))
    framing = GRPC_PREFIX_BYTES * result.stats.wire.messages_received
    return result.stats.wire.received - manifest - framing


def test_a_truncated_progressive_fetch_leaves_held_parts_out_and_decodes_bit_exact(
    source, store, start_server, connect
):
    v0, v1, v2 = _versions(source)
    client = connect(start_server(source, store))
    whole = client.get_manifest(
        ManifestRequest("global", state_digest(v0), SPEC, None, (state_digest(v1),))
    )
    assert [ref.tensor_name for ref in whole.held_parts] == [SHARED]
    budget = whole.encoded_bytes // 2
    result = client.fetch(spec=SPEC, base=v0, byte_budget=budget, held=_held(v0, v1))
    assert result.manifest.truncated and result.prefix is not None
    assert [ref.tensor_name for ref in result.manifest.held_parts] == [SHARED]
    assert result.state is not None
    expected = _expected_prefix(v0, v2, result.manifest.wanted_bytes)
    assert result.state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(result.state[name], tensor), name
    assert state_digest(result.state) == result.prefix.digest == result.digest
    # The server kept the same model (the next delta's base, the update's base).
    kept = source.get(result.digest.hex())
    assert kept is not None and state_digest(kept) == result.digest
    # Counted on the wire: no byte of the shared layer, the budget kept.
    assert _payload_received(result, budget, state_digest(v0)) <= budget


def test_the_whole_progressive_stream_without_held_parts_costs_their_bytes(
    source, store, start_server, connect
):
    v0, v1, v2 = _versions(source)
    client = connect(start_server(source, store))
    plain = client.fetch(spec=SPEC, base=v0)
    parts = client.fetch(spec=SPEC, base=v0, held=_held(v0, v1))
    assert plain.state is not None and parts.state is not None
    assert torch.equal(parts.state[SHARED], v2[SHARED])  # exact, where plain is 8-bit
    assert not torch.equal(plain.state[SHARED], v2[SHARED])
    assert state_digest(parts.state) == parts.manifest.decoded_digest
    # the shared layer's 8-bit delta codes: about a byte per value, none of them sent
    assert plain.stats.wire.received - parts.stats.wire.received > v2[SHARED].numel() // 2


def test_a_resumed_progressive_fetch_never_resends_a_byte_the_edge_holds(
    source, store, start_server, connect
):
    v0, v1, v2 = _versions(source)
    client = connect(start_server(source, store))
    held = _held(v0, v1)
    state = FetchState()
    whole = client.get_manifest(
        ManifestRequest("global", state_digest(v0), SPEC, None, (state_digest(v1),))
    )
    received: list[int] = []
    result = None
    for fraction in (0.3, 0.6, None):
        budget = None if fraction is None else int(whole.encoded_bytes * fraction)
        before = state.held_ids()
        result = client.fetch(spec=SPEC, base=v0, byte_budget=budget, state=state, held=held)
        new = state.held_ids() - before
        assert result.stats.wire.messages_received - 1 == len(new)  # only new segments
        received.append(_payload_received(result, budget, state_digest(v0)))
    # Every payload byte once (with its segment framing), the shared layer's never.
    framing = sum(received) - whole.encoded_bytes
    assert 0 <= framing < 40 * len(whole.segments)
    assert result is not None and result.state is not None
    assert result.digest == whole.decoded_digest
    assert torch.equal(result.state[SHARED], v2[SHARED])


def test_a_poisoned_held_part_is_not_used_in_a_prefix(source, store, start_server, connect):
    v0, v1, _ = _versions(source)
    client = connect(start_server(source, store))
    honest = _held(v0, v1)
    wrong = v1[SHARED].clone()
    wrong[0, 0] += 1.0
    poisoned = HeldVersions(honest.digests, {**honest.parts, part_digest(v1[SHARED]): wrong})
    whole = client.get_manifest(ManifestRequest("global", state_digest(v0), SPEC))
    result = client.fetch(spec=SPEC, base=v0, byte_budget=whole.encoded_bytes // 2, held=poisoned)
    # refetched without held parts: the shared layer came over the wire, never the wrong one
    assert result.manifest.held_parts == ()
    assert result.state is not None and not torch.equal(result.state[SHARED], wrong)
    assert result.stats.calls == 2


def test_verify_flags_a_wrong_part() -> None:
    from fedsqueeze.transport.parts import resolve_held_parts
    from fedsqueeze.wire.types import Manifest, PartRef

    tensor = torch.ones(4, 4)
    ref = PartRef("w", part_digest(tensor))
    manifest = Manifest.__new__(Manifest)
    object.__setattr__(manifest, "held_parts", (ref,))
    held = HeldVersions((), {ref.part_digest: torch.zeros(4, 4)})
    assert set(resolve_held_parts(manifest, held)) == {"w"}  # not hashed by default
    with pytest.raises(HeldPartError, match="does not match its digest"):
        resolve_held_parts(manifest, held, verify=True)


def test_a_cut_progressive_stream_resumes_without_resending_a_held_byte(
    source, store, start_server, connect
):
    """The stream breaks twice mid-way (injected faults); the client resumes with only
    the missing segments: every payload byte arrives once, the held layer's never."""
    from fedsqueeze.transport import FaultInjector

    v0, v1, v2 = _versions(source)
    faults = FaultInjector()
    faults.cut_streams_after(1, times=2)
    client = connect(start_server(source, store, faults=faults))
    result = client.fetch(spec=SPEC, base=v0, held=_held(v0, v1))
    assert faults.cuts == 2 and result.stats.retries == 2
    assert [ref.tensor_name for ref in result.manifest.held_parts] == [SHARED]
    assert result.state is not None and result.digest == result.manifest.decoded_digest
    assert torch.equal(result.state[SHARED], v2[SHARED])
    segments = len(result.manifest.segments)
    # one Fetch (manifest and a segment) and two StreamSegments (a segment, then the rest)
    assert result.stats.wire.messages_received == 1 + segments
    payload = result.stats.wire.received - len(
        fetch_manifest_message(
            result.manifest,
            ManifestRequest("global", state_digest(v0), SPEC, None, (state_digest(v1),)),
        )
    )
    assert 0 <= payload - result.manifest.encoded_bytes < 40 * segments
