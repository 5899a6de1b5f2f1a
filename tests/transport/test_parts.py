"""Part digests: a tensor's identity by content, not by name."""

from __future__ import annotations

import torch

from fedsqueeze.transport.parts import part_digest


def test_same_content_same_digest_whatever_the_name_or_layout() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert part_digest(t) == part_digest(t.clone())
    assert part_digest(t) == part_digest(t.t().contiguous().t().contiguous())
    assert len(part_digest(t)) == 32


def test_dtype_shape_and_bytes_each_change_the_digest() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    others = [t.reshape(4, 3), t.reshape(12), t.double(), t + 1, t.to(torch.int32)]
    digests = {part_digest(x) for x in [t, *others]}
    assert len(digests) == 1 + len(others)
