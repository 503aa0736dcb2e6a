"""What every module's ``loss`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossOutput:
    """A module's objective on one minibatch.

    Attributes
    ----------
    loss
        Scalar to minimise (already averaged over cells and warm-up weighted).
    reconstruction
        ``(B,)`` negative log-likelihood per cell, nats.
    kl
        ``(B,)`` unweighted KL divergence per cell, nats (zeros for non-variational models).
    extra
        Further per-cell ``(B,)`` terms to log, by name.
    """

    loss: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def elbo(self) -> torch.Tensor:
        """``(B,)`` evidence lower bound per cell (reconstruction + full KL), nats."""
        return -(self.reconstruction + self.kl)
