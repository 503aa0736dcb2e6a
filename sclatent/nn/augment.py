"""Count-aware augmentations that make two views of a cell for contrastive learning.

Each augmentation is a plain function of tensors with a documented rate, testable on its own;
:class:`CountAugmentation` composes them in the order a cell goes through them::

    x        counts of the cell                          (nonzeros: values of a CSR minibatch)
    x'       = Binomial(x, keep)                         binomial thinning: a shallower sequencing
    u        = log1p(x' / sum(x') * 1e4)                 log-normalised, at the thinned depth
    u        = (1 - w) u + w u_nb,  w ~ U(0, mix_max)    mixing with a kNN neighbour (CLEAR-style)
    u_g      = 0 with probability mask_rate              random gene masking (dropout-like)
    u        = u + noise_std * N(0, 1)                   Gaussian noise on the log scale

Thinning acts on the counts (it is the one augmentation that is exactly a count model: a
Binomial(x, p) subsample of a Poisson/NB count is again Poisson/NB with mean scaled by p);
the other three act on the log-normalised scale the encoder reads, where a neighbour's profile
and an additive jitter are commensurate whatever the two cells' library sizes.

Every function takes an optional ``torch.Generator``; without one they use torch's global
generator, which :func:`sclatent.train.fit` seeds, so seeded training is reproducible.
"""

from __future__ import annotations

import torch
from torch import nn

# Total count the log-normalisation scales each cell to (as scanpy's normalize_total(1e4)).
NORMALISED_TOTAL = 1e4


def binomial_thinning(counts: torch.Tensor, keep: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each count ``x`` replaced by a ``Binomial(x, keep)`` draw: every molecule kept independently.

    Parameters
    ----------
    counts
        Non-negative integer-valued counts, any shape (e.g. the ``(nnz,)`` nonzeros of a minibatch).
    keep
        Probability in ``(0, 1]`` of keeping each molecule: ``E[out] = keep * counts`` entrywise,
        ``Var[out] = keep (1 - keep) counts``.
    generator
        Source of randomness.

    Returns
    -------
    torch.Tensor
        Tensor of ``counts``' shape and dtype.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"thinning keep fraction must be in (0, 1], got {keep}.")
    if keep == 1.0:
        return counts
    prob = torch.full_like(counts, keep)
    return torch.binomial(counts, prob, generator=generator)


def gene_masking(x: torch.Tensor, rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` with each entry (a gene of a cell) set to zero independently with probability ``rate``.

    ``x`` is ``(B, G)``; on average ``rate * G`` genes of each cell are zeroed (no rescaling of
    the rest: a masked gene looks like a dropout, not like inverted-dropout regularisation).
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"gene masking rate must be in [0, 1), got {rate}.")
    if rate == 0.0:
        return x
    hidden = torch.rand(x.shape, generator=generator, device=x.device) < rate
    return x.masked_fill(hidden, 0.0)


def gaussian_jitter(x: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x + std * eps``, ``eps ~ N(0, 1)`` entrywise (``std`` in the units of ``x``: log1p expression)."""
    if std < 0:
        raise ValueError(f"noise standard deviation must be >= 0, got {std}.")
    if std == 0.0:
        return x
    return x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def neighbour_mixing(
    x: torch.Tensor, neighbour: torch.Tensor, max_weight: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each cell with one of its neighbours: ``(1 - w) x + w neighbour``, one ``w`` per cell.

    Parameters
    ----------
    x, neighbour
        ``(B, G)`` profiles of the cells and of one neighbour per cell (same scale).
    max_weight
        ``w ~ Uniform(0, max_weight)`` independently per cell, ``max_weight`` in ``[0, 1]``;
        ``E[w] = max_weight / 2``. Below 0.5 the cell always stays the larger part of its view.
    generator
        Source of randomness.

    Returns
    -------
    tuple of torch.Tensor
        ``(mixed (B, G), w (B,))``.
    """
    if not 0.0 <= max_weight <= 1.0:
        raise ValueError(f"neighbour mixing weight must be in [0, 1], got {max_weight}.")
    if x.shape != neighbour.shape:
        raise ValueError(
            f"cells and neighbours must have the same shape, got {tuple(x.shape)} and {tuple(neighbour.shape)}."
        )
    w = max_weight * torch.rand(x.shape[0], generator=generator, dtype=x.dtype, device=x.device)
    return torch.lerp(x, neighbour, w.unsqueeze(-1)), w


def log_normalise(counts: torch.Tensor) -> torch.Tensor:
    """``(B, G)`` ``log1p(counts / total * 1e4)`` per cell (cells with no counts stay zero)."""
    library = counts.sum(-1, keepdim=True).clamp(min=1.0)
    return torch.log1p(counts * (NORMALISED_TOTAL / library))


def dense_rows(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """``(n_rows, n_cols)`` dense matrix from COO coordinates (zeros elsewhere)."""
    dense = torch.zeros(n_rows, n_cols, dtype=values.dtype, device=values.device)
    dense[rows, cols] = values
    return dense


class CountAugmentation(nn.Module):
    """One random view of each cell: thinning -> log-normalise -> neighbour mixing -> masking -> noise.

    Parameters
    ----------
    thinning_keep
        Fraction of molecules kept by binomial thinning (1: off).
    mask_rate
        Probability of zeroing each gene of each cell (0: off).
    noise_std
        Standard deviation of the Gaussian noise on ``log1p`` expression (0: off).
    mix_max_weight
        Largest neighbour weight; ``w ~ U(0, mix_max_weight)`` per cell (0: off). Needs neighbour
        counts; without them the step is skipped.
    """

    def __init__(
        self, thinning_keep: float = 0.5, mask_rate: float = 0.2, noise_std: float = 0.2, mix_max_weight: float = 0.5
    ) -> None:
        super().__init__()
        # validate once, here, with the same messages the functions give
        binomial_thinning(torch.zeros(1), thinning_keep)
        gene_masking(torch.zeros(1), mask_rate)
        gaussian_jitter(torch.zeros(1), noise_std)
        neighbour_mixing(torch.zeros(1, 1), torch.zeros(1, 1), mix_max_weight)
        self.thinning_keep, self.mask_rate = float(thinning_keep), float(mask_rate)
        self.noise_std, self.mix_max_weight = float(noise_std), float(mix_max_weight)

    def forward(
        self,
        nz_row: torch.Tensor,
        nz_col: torch.Tensor,
        nz_val: torch.Tensor,
        n_cells: int,
        n_genes: int,
        neighbour_counts: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``(B, G)`` augmented log-normalised view of the cells whose nonzero counts are given.

        ``nz_row, nz_col, nz_val`` are the ``(nnz,)`` coordinates and counts of the cells;
        ``neighbour_counts`` the ``(B, G)`` dense counts of one neighbour per cell (or None).
        """
        thinned = binomial_thinning(nz_val, self.thinning_keep, generator)
        u = log_normalise(dense_rows(nz_row, nz_col, thinned, n_cells, n_genes))
        if neighbour_counts is not None and self.mix_max_weight > 0:
            u, _ = neighbour_mixing(u, log_normalise(neighbour_counts), self.mix_max_weight, generator)
        u = gene_masking(u, self.mask_rate, generator)
        return gaussian_jitter(u, self.noise_std, generator)

    def extra_repr(self) -> str:
        return (
            f"thinning_keep={self.thinning_keep}, mask_rate={self.mask_rate}, noise_std={self.noise_std}, "
            f"mix_max_weight={self.mix_max_weight}"
        )
