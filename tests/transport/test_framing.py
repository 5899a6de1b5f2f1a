"""The bytes around a small payload stay small: pinned, so they cannot silently regrow.

An edge's round in a bandwidth-budget run moves a few kB each way; before the framing diet
the fetch cost 728 bytes besides its payload (GetManifest and StreamSegments requests
that named the edge and a 64-character manifest id, a 460-byte manifest with a whole-
payload sha256 and the codec spec) and the push 256 (edge id, codec spec, a receipt
echoing the update id and sha256). The bounds below are the measured values plus a few
bytes.
"""

from __future__ import annotations

import pytest

from fedsqueeze.bench.framing import measure_framing

pytestmark = pytest.mark.timeout(60)


def test_fetch_and_push_framing_of_a_small_sparse_delta():
    framing = measure_framing("prune95-kmeans3")
    assert framing.fetch_calls == 1  # manifest and segments in one round trip
    # Up: model digest, base digest, codec spec. Down: the manifest (key, decoded digest,
    # one descriptor), then the segment's 11 bytes of framing.
    assert framing.fetch_framing_up <= 110, framing
    assert framing.fetch_framing_down <= 125, framing
    assert framing.fetch_framing_bytes <= 230, framing  # was 728
    # Up: update id (the edge's, 30 characters), size, sha256; down: the receipt.
    assert framing.push_framing_up <= 90, framing
    assert framing.push_framing_down <= 12, framing
    assert framing.push_framing_bytes <= 100, framing  # was 256
