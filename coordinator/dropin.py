"""Compression for an existing Flower server app, in one ``with`` statement.

::

    from coordinator.dropin import compressed

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        with compressed(FedAvg(fraction_train=0.5), down_spec="int8") as strategy:
            strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=3)

Pair it with ``ClientApp(mods=[fedsqueeze_mod])`` on the client side
(:mod:`edge.mod`). The wrapped strategy's sampling and aggregation are unchanged; what
changes is that model bytes travel, compressed, over the fedsqueeze data plane.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.serverapp.strategy import Strategy

from coordinator.dataplane import CoordinatorDataPlane, InstructionTemplate
from coordinator.strategy import CompressedStrategy
from coordinator.version_store import VersionStore
from fedsqueeze.codec.spec_text import parse_spec


@contextmanager
def compressed(
    strategy: Strategy,
    *,
    down_spec: str = "int8",
    up_spec: str = "topk10-int4",
    state_dir: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    advertise: str = "",
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    clip_norm: float | None = None,
) -> Iterator[CompressedStrategy]:
    """Wrap ``strategy`` and run a data plane for as long as the block lasts.

    Parameters
    ----------
    strategy
        Any Flower strategy (FedAvg, FedProx, FedAdam, ...).
    down_spec, up_spec
        Codec specs (text form) for models sent down and updates sent up.
    state_dir
        Where versions are kept (a temporary directory by default).
    host, port, advertise
        Where the data plane listens, and the address edges dial if different.
    tls_cert, tls_key
        PEM files; without them the data plane is plaintext, on loopback only.
    clip_norm
        Optional L2 bound on each update.
    """
    parse_spec(down_spec)
    parse_spec(up_spec)  # fail before starting anything
    with tempfile.TemporaryDirectory(prefix="fedsqueeze-") as tmp:
        store = VersionStore(Path(state_dir) if state_dir is not None else Path(tmp))
        plane = CoordinatorDataPlane(
            store, host=host, port=port, advertise=advertise, tls_cert=tls_cert, tls_key=tls_key
        )
        try:
            template = InstructionTemplate(down_spec=down_spec, up_spec=up_spec)
            yield CompressedStrategy(
                strategy,
                store,
                functools.partial(plane.instruction, template),
                plane.pull,
                clip_norm=clip_norm,
            )
        finally:
            plane.close()
