"""Content digests of model states: the identity of a model version.

A digest is the sha256 of a canonical serialization: tensors in sorted name order, each
as its UTF-8 name, dtype name, shape and little-endian contiguous bytes, every field
length-prefixed so no two different states serialize alike.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import Any

import torch

DIGEST_BYTES = 32


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's contiguous little-endian bytes on the host (one copy off-device).

    Parameters
    ----------
    t
        Any dense tensor, on any device.
    """
    host = t.detach().to("cpu").contiguous().reshape(-1)
    if host.dtype == torch.bool:
        host = host.to(torch.uint8)
    array: Any = host.view(torch.uint8).numpy()
    return memoryview(array).cast("B")


def state_digest(state: Mapping[str, torch.Tensor]) -> bytes:
    """The 32-byte sha256 digest identifying ``state``.

    Parameters
    ----------
    state
        A ``state_dict``-like mapping of names to tensors; order does not matter.
    """
    h = hashlib.sha256()
    h.update(struct.pack("<Q", len(state)))
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state[{name!r}] is {type(t).__name__}, not a tensor")
        meta = f"{name}\x00{str(t.dtype).removeprefix('torch.')}\x00{tuple(t.shape)}".encode()
        h.update(struct.pack("<Q", len(meta)))
        h.update(meta)
        data = tensor_bytes(t)
        h.update(struct.pack("<Q", len(data)))
        h.update(data)
    return h.digest()
