"""Input corruptions of denoising autoencoders (Vincent et al. 2008, 2010).

* ``"gaussian"``: additive isotropic noise, ``x + rate * N(0, 1)`` (``rate`` is the standard
  deviation, in the units of the input: log-normalised expression here);
* ``"salt"``: Bernoulli dropout noise, each entry set to 0 with probability ``rate`` (no
  rescaling: the corruption mimics dropouts, not the regulariser);
* ``"masking"``: like ``"salt"``, and the binary mask of the hidden entries is concatenated to the
  input, so the encoder knows which zeros are missing rather than observed (as in masked
  modelling); the input width doubles;
* ``"none"``: a plain (bottleneck) autoencoder.

Corruption applies in training mode only; in evaluation the input passes clean (with an all-zero
mask for ``"masking"``, so the width is unchanged).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

NoiseKind = Literal["none", "gaussian", "salt", "masking"]
#: The corruptions ``kind`` may name.
NOISE_KINDS: tuple[str, ...] = get_args(NoiseKind)


def gaussian_noise(x: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x + std * eps`` with ``eps ~ N(0, 1)`` entrywise; same shape as ``x``."""
    return x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def salt_noise(x: torch.Tensor, rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` with each entry set to zero independently with probability ``rate``."""
    return masking_noise(x, rate, generator)[0]


def masking_noise(
    x: torch.Tensor, rate: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x with hidden entries zeroed, mask)``; ``mask`` is 1.0 where an entry was hidden.

    Each entry is hidden independently with probability ``rate``. Both outputs have ``x``'s shape.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise rate must be in [0, 1), got {rate}.")
    hidden = torch.rand(x.shape, generator=generator, device=x.device) < rate
    return x.masked_fill(hidden, 0.0), hidden.to(x.dtype)


class InputNoise(nn.Module):
    """One of :data:`NOISE_KINDS` applied to a ``(B, n_features)`` input in training mode.

    Parameters
    ----------
    kind
        ``"none"``, ``"gaussian"``, ``"salt"`` or ``"masking"``.
    rate
        Standard deviation (``"gaussian"``) or probability of hiding an entry (``"salt"``,
        ``"masking"``).
    """

    def __init__(self, kind: str = "gaussian", rate: float = 0.1) -> None:
        super().__init__()
        if kind not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {kind!r}.")
        if kind == "gaussian" and rate < 0:
            raise ValueError(f"the Gaussian noise's standard deviation must be >= 0, got {rate}.")
        if kind in ("salt", "masking") and not 0.0 <= rate < 1.0:
            raise ValueError(f"noise rate must be in [0, 1) for {kind!r} noise, got {rate}.")
        self.kind, self.rate = kind, float(rate)

    def output_width(self, n_features: int) -> int:
        """Width of the corrupted input: doubled by the concatenated mask of ``"masking"``."""
        return 2 * n_features if self.kind == "masking" else n_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "masking":
            if self.training and self.rate > 0:
                x, mask = masking_noise(x, self.rate)
            else:
                mask = torch.zeros_like(x)
            return torch.cat([x, mask], dim=-1)
        if not self.training or self.kind == "none" or self.rate == 0:
            return x
        if self.kind == "gaussian":
            return gaussian_noise(x, self.rate)
        return salt_noise(x, self.rate)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, rate={self.rate}"
