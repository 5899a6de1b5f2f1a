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

Frozen tensors (a pretrained backbone) travel at most once and are never aggregated::

    with compressed(FedAvg(), down_spec="int8", freeze="frozen.*") as strategy: ...

The patterns are added to both specs, so the mod leaves them out of every delta and
update, and the wrapped strategy sees only the trainable arrays.
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
from fedsqueeze.codec.spec_text import parse_freeze, parse_spec, with_freeze
from fedsqueeze.errors import ConfigError


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
    freeze: str = "",
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
    freeze
        Glob patterns of frozen tensor names joined by ``|`` (with any the specs' own
        ``freeze`` keys name): they travel at most once, in a first full download, and
        the wrapped strategy never sees them.

    Raises
    ------
    ConfigError
        A spec or a freeze pattern that cannot be parsed, before anything starts.
    """
    try:
        extra = parse_freeze(freeze)
    except ValueError as exc:
        raise ConfigError(f"freeze={freeze!r}: {exc}") from None
    frozen = tuple(sorted({*extra, *parse_spec(down_spec).freeze, *parse_spec(up_spec).freeze}))
    down_spec, up_spec = with_freeze(down_spec, frozen), with_freeze(up_spec, frozen)
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
                frozen=frozen,
            )
        finally:
            plane.close()
