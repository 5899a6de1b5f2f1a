"""FedDF fusion as an aggregation (Lin et al., 2020): ``aggregation = feddf``.

Instead of keeping the weighted average of a round's client models, the coordinator
distils the average of their logits on its unlabelled proxy set into that average
(:func:`coordinator.distill.fuse`). Where the clients' models agree the result is the
average; where they disagree the ensemble's outputs, not its parameters, decide. When
every client model equals the global one the global model comes back unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn

from coordinator.distill import DistillConfig, fuse

__all__ = ["FeddfFusion"]

log = logging.getLogger(__name__)


class FeddfFusion:
    """Fuses client models by ensemble distillation on the proxy inputs.

    Parameters
    ----------
    proxy_x
        The coordinator's proxy inputs ``[N, ...]`` (no labels).
    config
        The distillation (``ce_weight`` must be 0).
    """

    def __init__(self, proxy_x: Tensor, config: DistillConfig) -> None:
        if config.ce_weight > 0:
            raise ValueError("fusion distils on unlabelled proxy inputs: ce_weight must be 0")
        self.proxy_x = proxy_x
        self.config = config

    def __call__(
        self,
        states: Sequence[Mapping[str, Tensor]],
        weights: Sequence[float],
        build: Callable[[], nn.Module],
    ) -> dict[str, Tensor]:
        """The fused state of ``states`` (one architecture, made by ``build``)."""
        models = []
        for state in states:
            model = build()
            model.load_state_dict(dict(state))
            models.append(model)
        result = fuse(models, self.proxy_x, self.config, weights=weights)
        log.info(
            "FedDF fusion of %d models on %d proxy inputs: loss %.4f, %.1f s",
            len(models),
            int(self.proxy_x.shape[0]),
            result.loss,
            result.seconds,
        )
        return {k: v.detach().clone() for k, v in result.student.state_dict().items()}
