"""``sclatent.model.VAE``: the scVI-style count VAE for AnnData."""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import torch

from ..base import seeded
from ..data.registry import library_log_prior
from ..modules.vae import VAEHyperparameters, VAEModule
from ._base import BaseModel
from ._expression import CountExpressionOutputs


def count_vae_module_kwargs(model: BaseModel, n_labels: int) -> dict[str, Any]:
    """What a count VAE's module is built from (``VAE`` and ``SemiSupervisedVAE``): the registry's
    sizes, the model's hyperparameters and, for a latent library, the per-batch log-library prior."""
    reg = model.registry
    kwargs = dict(
        n_genes=reg.n_genes,
        n_batch=reg.n_batch,
        n_labels=n_labels,
        n_cats_per_cov=reg.n_cats_per_covariate,
        n_continuous=len(reg.continuous_covariate_keys),
        **model._module_hyperparameters(),
    )
    if not model.hyperparameters["use_observed_library"] and model.adata is not None:
        prior = library_log_prior(model.adata, reg, source=model._count_source())
        kwargs["library_log_means"], kwargs["library_log_vars"] = prior
    return kwargs


class VAE(CountExpressionOutputs, BaseModel):
    """Variational autoencoder for single-cell counts (the scVI model).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`VAE.setup_anndata`.
    {hyperparameters}
    seed
        Seed of the weight initialisation (and the default seed of ``train``).

    Examples
    --------
    >>> import sclatent
    >>> adata = sclatent.datasets.pbmc68k_counts()
    >>> sclatent.model.VAE.setup_anndata(adata, labels_key="bulk_labels")
    >>> model = sclatent.model.VAE(adata)
    >>> model.train(max_epochs=50)
    >>> adata.obsm["X_sclatent_vae"] = model.get_latent_representation()
    """

    module_class = VAEModule
    hyperparameters_class = VAEHyperparameters
    name = "vae"

    def _check_hyperparameters(self) -> None:
        if self.hyperparameters["dispersion"] == "gene-label" and not self.registry.labels_key:
            raise ValueError("dispersion='gene-label' needs labels: call setup_anndata(adata, labels_key=...).")

    def _module_kwargs(self) -> dict[str, Any]:
        return count_vae_module_kwargs(self, self.registry.n_labels)

    def _count_module(self) -> VAEModule:
        return self.module

    # ----------------------------------------------------------------- outputs

    @torch.no_grad()
    def get_latent_representation(
        self,
        adata: ad.AnnData | None = None,
        indices=None,
        give_mean: bool = True,
        batch_size: int = 1024,
        seed: int | None = None,
    ) -> np.ndarray:
        """Posterior mean (or a sample) of z for each cell.

        With ``posterior="iaf"``, ``give_mean=True`` returns the flow applied to the Gaussian mean
        (the image of the base distribution's mode: deterministic and one pass; not the exact mean of
        q, which has no closed form); ``give_mean=False`` a draw from q.

        Returns
        -------
        numpy.ndarray
            ``(n_cells, n_latent)`` float32; write it to ``adata.obsm["X_sclatent_vae"]`` for
            ``sc.pp.neighbors(adata, use_rep="X_sclatent_vae")``.
        """
        out = []
        with seeded(seed):
            for batch in self._batches(adata, indices, batch_size):
                inf = self.module.inference(batch)
                out.append((self.module.latent_mean(inf) if give_mean else inf["z"]).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.module.n_latent), np.float32)

    @torch.no_grad()
    def get_marginal_ll(
        self,
        adata: ad.AnnData | None = None,
        indices=None,
        n_mc_samples: int = 1000,
        batch_size: int = 128,
        return_mean: bool = True,
        seed: int | None = 0,
    ) -> float | np.ndarray:
        """Importance-sampled marginal log-likelihood log p(x) (nats per cell; higher is better).

        Use ``indices=model.validation_indices`` for the held-out likelihood. With a flow prior
        the importance weights use the flow's log-density ``log p(z)``.
        """
        out = []
        with seeded(seed):
            for batch in self._batches(adata, indices, batch_size):
                out.append(self.module.marginal_log_likelihood(batch, n_mc_samples).cpu())
        values = torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)
        if return_mean:
            return float(values.mean()) if values.size else float("nan")
        return values

    def _mean_per_cell(self, per_cell, adata, indices, batch_size: int, seed: int | None) -> float:
        """Mean over cells of ``per_cell(batch) -> (B,)``; NaN for no cells."""
        total, n = 0.0, 0
        with torch.no_grad(), seeded(seed):
            for batch in self._batches(adata, indices, batch_size):
                total += float(per_cell(batch).sum())
                n += batch.size
        return total / n if n else float("nan")

    def get_elbo(
        self, adata: ad.AnnData | None = None, indices=None, batch_size: int = 1024, seed: int | None = 0
    ) -> float:
        """Mean evidence lower bound per cell (nats; one posterior sample per cell)."""
        return self._mean_per_cell(lambda b: self.module.loss(b).elbo, adata, indices, batch_size, seed)

    def get_reconstruction_error(
        self, adata: ad.AnnData | None = None, indices=None, batch_size: int = 1024, seed: int | None = 0
    ) -> float:
        """Mean negative log-likelihood -log p(x | z) per cell (nats; z sampled from q)."""
        return self._mean_per_cell(
            lambda b: self.module.loss(b).terms["reconstruction"], adata, indices, batch_size, seed
        )

    def get_kl_divergence(
        self, adata: ad.AnnData | None = None, indices=None, batch_size: int = 1024, seed: int | None = 0
    ) -> float:
        """Mean KL(q(z|x) || p(z)) per cell (nats): analytic for the normal prior, a one-sample
        Monte Carlo estimate per cell for a flow prior (``seed`` fixes its draws)."""

        def kl(batch):
            return self.module.kl_z(self.module.inference(batch))

        return self._mean_per_cell(kl, adata, indices, batch_size, seed)

    @torch.no_grad()
    def get_prior_log_prob(self, z: np.ndarray) -> np.ndarray:
        """log p(z) of the model's prior (nats) at latent points ``z``, ``(n, n_latent) -> (n,)``.

        For a flow prior this is the learned density; e.g. evaluate it on a grid to plot it.
        """
        z = torch.as_tensor(np.asarray(z), dtype=torch.float32, device=self.device)
        if z.dim() != 2 or z.shape[1] != self.module.n_latent:
            raise ValueError(f"z must be (n, {self.module.n_latent}), got {tuple(z.shape)}.")
        self.module.eval()
        return self.module.prior_log_prob(z).cpu().numpy().astype(np.float64)
