"""Streams earlier encoders wrote: a decoder must go on reading them, to the same values.

Golden vectors (``tests/golden/vN/``) pin the bytes today's encoder writes. When the
encoder changes a choice the format leaves to it (which records it writes, which of
several tied values pruning drops), those bytes change without a format change. The
streams it wrote before stay here, each beside what it decoded to when it was archived
(``NAME.pt``: the base it is a delta against, and the decoded state), grouped by the
change that replaced them:

- ``before-zero-records/``: v1 streams from before unchanged tensors became ZERO records;
- ``before-tie-rule/``: v1, v7 and v9 streams from before pruning's tie rule (of the
  values tied at the cut, the lowest indices go first; ``torch.topk`` chose before).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsqueeze.codec import EncodedModel, decode_state

ARCHIVE = Path(__file__).parent.parent / "golden" / "archive"
STREAMS = sorted(ARCHIVE.glob("*/*.fsq"))


def test_the_archive_holds_both_generations() -> None:
    assert {p.parent.name for p in STREAMS} == {"before-zero-records", "before-tie-rule"}
    assert len(STREAMS) == 8
    assert all(p.with_suffix(".pt").is_file() for p in STREAMS)


@pytest.mark.parametrize("path", STREAMS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_archived_streams_decode_to_what_they_decoded_to(path: Path) -> None:
    stored = torch.load(path.with_suffix(".pt"), weights_only=True)
    base = stored["base"] or None
    decoded = decode_state(EncodedModel.from_bytes(path.read_bytes()), base)
    want = stored["decoded"]
    assert list(decoded) == list(want)
    for name, tensor in want.items():
        assert decoded[name].dtype == tensor.dtype, name
        assert torch.equal(decoded[name], tensor), name
