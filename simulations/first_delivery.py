"""An edge's first download as the whole model under its own spec, outside the budget.

By default every edge rebuilds the initial model from the task's seed and installed
weights (no bytes). A sweep arm with ``first-delivery`` instead sends it: the edge's first
download is the whole model, frozen tensors included, under that spec (for example the
pretrained backbone once in 4-bit blocks); from then on the arm's own policy chooses as
before. The first delivery is sent whatever the per-round budget (a budget sized for
adapters could never carry a backbone) and counted with every other byte.
"""

from __future__ import annotations

from dataclasses import replace

from coordinator.budget import BudgetPolicy, Choice, EdgeRequest, Skip

__all__ = ["FirstDeliveryPolicy"]


class FirstDeliveryPolicy:
    """Wraps a :class:`~coordinator.budget.BudgetPolicy`: an edge that holds nothing gets
    ``spec`` for its download, and the upload the wrapped policy chooses for an edge
    holding the initial model.

    Parameters
    ----------
    inner
        The arm's policy; it chooses every later download and every upload.
    spec
        Codec spec (text) of the first download.
    init_digest
        Hex digest of the initial model, what the edge holds once the first delivery is
        decoded, as far as the wrapped policy's sizing goes.
    """

    def __init__(self, inner: BudgetPolicy, spec: str, init_digest: str) -> None:
        self.inner = inner
        self.spec = spec
        self.init_digest = init_digest

    def choose(self, request: EdgeRequest) -> Choice | Skip:
        """The wrapped policy's choice, with ``spec`` down for an edge holding nothing."""
        if request.held is not None:
            return self.inner.choose(request)
        choice = self.inner.choose(replace(request, held=self.init_digest))
        if isinstance(choice, Skip):
            return choice
        # 0: not sized, no byte limit on this download.
        return replace(choice, down_spec=self.spec, down_payload=0, down_bytes=0)

    def observe(self, bytes_down: int, bytes_up: int, *, compute_s: float | None = None) -> None:
        """Passed on to the wrapped policy."""
        self.inner.observe(bytes_down, bytes_up, compute_s=compute_s)
