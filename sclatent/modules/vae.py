"""The scVI generative model as a pure ``torch.nn.Module`` (no AnnData, no training loop).

Generative model, for a cell with batch ``s``::

    z ~ N(0, I)                                   (n_latent)
    l ~ LogNormal(mu_s, sigma_s^2)  or  l = observed total counts
    rho = softmax(f(z, s))                        (n_genes, sums to 1)
    x_g ~ ZINB(l * rho_g, theta_g, pi_g(z, s))    (or NB / Poisson)

Inference: ``q(z | x, s) = N(m(log1p x, s), v(log1p x, s))`` and, for a latent library,
``q(log l | x, s)`` Gaussian.

With ``prior="planar"`` or ``"realnvp"`` the prior of ``z`` is a learned normalizing flow
(:class:`sclatent.nn.flows.FlowPrior`) instead of ``N(0, I)``; its KL term is then estimated by
Monte Carlo and the importance weights of the marginal likelihood use the flow's log-density.

With ``posterior="iaf"`` the encoder's Gaussian sample ``z0`` is pushed through an inverse
autoregressive flow conditioned on the cell (:class:`sclatent.nn.flows.IAFPosterior`):
``log q(z | x) = log N(z0; m, v) - log |det dz/dz0|`` and the KL is the one-sample estimate
``log q(z | x) - log p(z)`` (with either prior).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import torch
from torch import nn

from ..contracts import LossOutput, Module
from ..data.loader import MiniBatch
from ..distributions import (
    GeneLikelihood,
    gaussian_kl,
    gaussian_log_prob,
    nb_log_coefficients,
    sample,
    softmax_count_log_likelihood,
)
from ..hyperparameters import Hyperparameters, setting
from ..nn import CountDecoder, GaussianEncoder, SparseRows
from . import fused_elbo

Dispersion = Literal["gene", "gene-batch", "gene-label", "gene-cell"]
Prior = Literal["normal", "planar", "realnvp"]
Posterior = Literal["normal", "iaf"]
DISPERSIONS, PRIORS, POSTERIORS = get_args(Dispersion), get_args(Prior), get_args(Posterior)


@dataclass(frozen=True)
class CountVAEHyperparameters(Hyperparameters):
    """What every count VAE shares (encoder, decoder, likelihood, covariates): the base of
    :class:`VAEHyperparameters` and of the semi-supervised VAE's
    (:class:`sclatent.modules.ssvae.SemiSupervisedVAEHyperparameters`)."""

    family: ClassVar[str] = "VAE"

    n_latent: int = setting(10, "Latent dimension.", minimum=1)
    n_hidden: int = setting(128, "Width of the hidden layers of encoder and decoder.", minimum=1)
    n_layers: int = setting(1, "Hidden layers of encoder and decoder.", minimum=1)
    dropout_rate: float = setting(0.1, "Dropout probability in the encoder.", minimum=0.0, maximum=0.99)
    dispersion: Dispersion = setting(
        "gene", "Inverse-dispersion sharing: per gene, per gene and batch, per gene and label, or per cell."
    )
    gene_likelihood: GeneLikelihood = setting("zinb", "Count distribution of each gene.")
    use_observed_library: bool = setting(
        True, "Use the observed log total counts as library size rather than a latent log-normal one."
    )
    encode_covariates: bool = setting(True, "Condition the encoder on batch and covariates (the decoder always is).")
    inject_covariates: bool = setting(True, "Feed covariates into every hidden layer, not only the first.")


@dataclass(frozen=True)
class VAEHyperparameters(CountVAEHyperparameters):
    """The count VAE's hyperparameters, declared once: read by :class:`VAEModule`,
    :class:`sclatent.model.VAE` and the ``fit-vae`` / ``fit-flow`` commands."""

    family: ClassVar[str] = "VAE"

    prior: Prior = setting(
        "normal", "Prior of z: N(0, I) or a learned normalizing flow (planar layers or affine couplings)."
    )
    n_flows: int = setting(8, "Layers of a flow prior.")
    flow_hidden: int = setting(64, "Hidden width of each RealNVP coupling's conditioner.", minimum=1)
    posterior: Posterior = setting(
        "normal", "Posterior of z: the Gaussian encoder, or its sample pushed through an inverse autoregressive flow."
    )
    n_posterior_flows: int = setting(4, "IAF layers of an IAF posterior.")
    posterior_flow_hidden: int = setting(64, "Hidden width of each IAF layer's autoregressive network.", minimum=1)

    def validate(self) -> None:
        if self.prior != "normal" and self.n_flows < 1:
            raise ValueError(f"n_flows must be >= 1 for a flow prior, got {self.n_flows}.")
        if self.posterior != "normal" and self.n_posterior_flows < 1:
            raise ValueError(f"n_posterior_flows must be >= 1 for an IAF posterior, got {self.n_posterior_flows}.")


class VAEModule(Module):
    """scVI-style variational autoencoder for counts.

    Parameters
    ----------
    n_genes
        Number of genes ``G``.
    n_batch, n_labels
        Numbers of batches and labels (1 when none registered).
    n_cats_per_cov
        Category counts of extra categorical covariates.
    n_continuous
        Number of continuous covariates.
    library_log_means, library_log_vars
        ``(n_batch,)`` prior of the latent log library per batch (``use_observed_library=False``).
    **hyperparameters
        :class:`VAEHyperparameters` (``n_latent``, ``gene_likelihood``, ``prior``, ...).
    """

    default_monitor = "elbo"

    def __init__(
        self,
        n_genes: int,
        n_batch: int = 1,
        n_labels: int = 1,
        n_cats_per_cov: list[int] = (),
        n_continuous: int = 0,
        library_log_means: np.ndarray | None = None,
        library_log_vars: np.ndarray | None = None,
        **hyperparameters: Any,
    ) -> None:
        super().__init__()
        settings = VAEHyperparameters.from_dict(hyperparameters)
        n_latent, n_hidden, n_layers = settings.n_latent, settings.n_hidden, settings.n_layers
        dropout_rate, dispersion, gene_likelihood = settings.dropout_rate, settings.dispersion, settings.gene_likelihood
        use_observed_library, encode_covariates = settings.use_observed_library, settings.encode_covariates
        inject_covariates, prior, posterior = settings.inject_covariates, settings.prior, settings.posterior
        self.n_genes, self.n_batch, self.n_labels, self.n_latent = n_genes, n_batch, n_labels, n_latent
        self.dispersion, self.gene_likelihood = dispersion, gene_likelihood
        self.use_observed_library = use_observed_library
        self.encode_covariates = encode_covariates
        cats = [n_batch, *n_cats_per_cov]
        mlp = dict(n_layers=n_layers, inject_covariates=inject_covariates, n_continuous=n_continuous)
        # the encoders read log1p counts as a sparse matrix: nnz * n_hidden work instead of B * G * n_hidden
        enc_mlp = dict(mlp, n_cats_per_cov=cats if encode_covariates else [], sparse_input=True)
        if not encode_covariates:
            enc_mlp["n_continuous"] = 0
        self.z_encoder = GaussianEncoder(n_genes, n_latent, n_hidden, dropout_rate=dropout_rate, **enc_mlp)
        if not use_observed_library:
            self.l_encoder = GaussianEncoder(
                n_genes, 1, n_hidden, dropout_rate=dropout_rate, **dict(enc_mlp, n_layers=1)
            )
            if library_log_means is None:
                library_log_means, library_log_vars = np.zeros(n_batch), np.ones(n_batch)
            self.register_buffer("library_log_means", torch.as_tensor(library_log_means, dtype=torch.float32))
            self.register_buffer("library_log_vars", torch.as_tensor(library_log_vars, dtype=torch.float32))
        heads = ["scale"]
        if gene_likelihood == "zinb":
            heads.append("zi_logits")
        if dispersion == "gene-cell":
            heads.append("log_theta")
        self.decoder = CountDecoder(
            n_latent, n_genes, tuple(heads), n_hidden, n_cats_per_cov=cats, dropout_rate=0.0, **mlp
        )
        rows = {"gene": 1, "gene-batch": n_batch, "gene-label": n_labels, "gene-cell": 0}[dispersion]
        self.log_theta = nn.Parameter(torch.randn(rows, n_genes)) if rows else None
        # built last so that a normal-prior module draws exactly the same initial weights as before
        self.prior = prior
        self.prior_flow = None
        if prior != "normal":
            # imported here: pyro (the flows' layers) costs import time the normal prior does not need
            from ..nn.flows import FlowPrior

            self.prior_flow = FlowPrior(n_latent, prior, settings.n_flows, settings.flow_hidden)
        # after everything else, for the same reason
        self.posterior = posterior
        self.posterior_flow = None
        if posterior != "normal":
            from ..nn.flows import IAFPosterior

            self.posterior_flow = IAFPosterior(
                n_latent, 2 * n_latent, settings.n_posterior_flows, settings.posterior_flow_hidden
            )

    # -------------------------------------------------------------------- query mapping

    def add_batch_categories(
        self,
        n_new: int,
        library_log_means: np.ndarray | None = None,
        library_log_vars: np.ndarray | None = None,
    ) -> dict[str, torch.Tensor]:
        """Grow the module in place by ``n_new`` batches, appended after the old ones (scArches).

        Every network reading the batch (the decoder; the encoders with ``encode_covariates``)
        gets ``n_new`` new rows in its batch embeddings (:meth:`sclatent.nn.MLP.add_categories`;
        a module with one batch had none and gets embeddings whose old row is zeros), a
        ``dispersion="gene-batch"`` module new rows of ``log_theta`` (drawn ``N(0, 1)`` as at
        construction), and a latent-library module new entries of its library prior. Old
        batches' computations are unchanged, and the module's state dict then has the names and
        shapes of a module built with ``n_batch + n_new`` batches, so it saves and loads as one.

        Parameters
        ----------
        n_new
            Batches to add (>= 1).
        library_log_means, library_log_vars
            ``(n_new,)`` prior of the latent log library of the new batches (used when
            ``use_observed_library=False``; default mean 0, variance 1).

        Returns
        -------
        dict[str, torch.Tensor]
            For every grown parameter, its name in ``named_parameters()`` and a bool mask of its
            shape, True on the entries that belong to the new batches (what query training trains).
        """
        if n_new < 1:
            raise ValueError(f"n_new must be >= 1, got {n_new}.")
        masks: dict[str, torch.Tensor] = {}
        networks = {"decoder.body": self.decoder.body}
        if self.encode_covariates:
            networks["z_encoder.body"] = self.z_encoder.body
            if not self.use_observed_library:
                networks["l_encoder.body"] = self.l_encoder.body
        for prefix, mlp in networks.items():
            masks.update({f"{prefix}.{name}": mask for name, mask in mlp.add_categories(0, n_new).items()})
        if self.dispersion == "gene-batch":
            old = self.log_theta.detach()
            self.log_theta = nn.Parameter(torch.cat([old, torch.randn(n_new, self.n_genes).to(old)]))
            mask = torch.zeros(self.log_theta.shape, dtype=torch.bool, device=old.device)
            mask[self.n_batch :] = True
            masks["log_theta"] = mask
        if not self.use_observed_library:
            means = np.zeros(n_new) if library_log_means is None else np.asarray(library_log_means)
            variances = np.ones(n_new) if library_log_vars is None else np.asarray(library_log_vars)
            if means.shape != (n_new,) or variances.shape != (n_new,):
                raise ValueError(f"library_log_means and library_log_vars must be ({n_new},) arrays.")
            old_means, old_vars = self.library_log_means, self.library_log_vars
            self.library_log_means = torch.cat([old_means, torch.as_tensor(means).to(old_means)])
            self.library_log_vars = torch.cat([old_vars, torch.as_tensor(variances).to(old_vars)])
        self.n_batch += n_new
        return masks

    # -------------------------------------------------------------------- pieces

    def inference(self, batch: MiniBatch, n_samples: int = 1) -> dict[str, torch.Tensor]:
        """Posterior parameters and samples.

        Returns ``qz_mean, qz_var`` ``(B, n_latent)``, ``z`` ``(n_samples, B, n_latent)`` (no sample
        axis when ``n_samples == 1``), ``log_library`` (same leading shape, trailing ``1``) and for
        a latent library ``ql_mean, ql_var`` ``(B, 1)``.
        """
        cats, cont = batch.covariates()
        if not self.encode_covariates:
            cats, cont = [], None
        x = SparseRows.from_coordinates(batch.nz_row, batch.nz_col, torch.log1p(batch.nz_val), batch.size, self.n_genes)
        qz_mean, qz_var, z = self.z_encoder(x, cats, cont)
        out = {"qz_mean": qz_mean, "qz_var": qz_var}
        if n_samples > 1:
            z = qz_mean + qz_var.sqrt() * torch.randn((n_samples, *qz_mean.shape), device=z.device, dtype=z.dtype)
        if self.posterior_flow is not None:
            out["z0"] = z
            z, out["log_det_q"] = self.posterior_flow(z, self._posterior_context(qz_mean, qz_var))
        out["z"] = z
        if self.use_observed_library:
            log_library = torch.log(batch.library.clamp(min=1.0)).unsqueeze(-1)
            out["log_library"] = log_library.expand(n_samples, -1, -1) if n_samples > 1 else log_library
        else:
            ql_mean, ql_var, log_library = self.l_encoder(x, cats, cont)
            if n_samples > 1:
                log_library = ql_mean + ql_var.sqrt() * torch.randn(
                    (n_samples, *ql_mean.shape), device=ql_mean.device, dtype=ql_mean.dtype
                )
            out.update(ql_mean=ql_mean, ql_var=ql_var, log_library=log_library)
        return out

    @staticmethod
    def _posterior_context(qz_mean: torch.Tensor, qz_var: torch.Tensor) -> torch.Tensor:
        """What the IAF posterior is conditioned on: the Gaussian's parameters ``[m, log v]``."""
        return torch.cat([qz_mean, torch.log(qz_var)], dim=-1)

    def latent_mean(self, inf: dict[str, torch.Tensor]) -> torch.Tensor:
        """A point estimate of z per cell: ``qz_mean``, or for an IAF posterior the flow applied to it
        (the image of the Gaussian's mode; cheap and deterministic, not the mean of q)."""
        if self.posterior_flow is None:
            return inf["qz_mean"]
        context = self._posterior_context(inf["qz_mean"], inf["qz_var"])
        return self.posterior_flow(inf["qz_mean"], context)[0]

    def posterior_log_prob(self, inf: dict[str, torch.Tensor]) -> torch.Tensor:
        """log q(z | x) at ``inf["z"]`` (nats), ``(...,)``: Gaussian, minus the IAF's log-determinant."""
        if self.posterior_flow is None:
            return gaussian_log_prob(inf["z"], inf["qz_mean"], inf["qz_var"])
        return gaussian_log_prob(inf["z0"], inf["qz_mean"], inf["qz_var"]) - inf["log_det_q"]

    def _decode(self, z: torch.Tensor, batch: MiniBatch) -> dict[str, torch.Tensor | None]:
        """Decoder heads for ``z`` (``(..., B, n_latent)``): ``logits`` (before the softmax over
        genes), ``zi_logits`` (ZINB) and ``log_theta`` (broadcastable to ``(..., B, G)``)."""
        cats, cont = batch.covariates()
        lead = z.shape[:-1]
        if z.dim() > 2:  # flatten the sample axis: the decoder's BatchNorm expects 2-D input
            cats = [c.expand(*lead).reshape(-1) for c in cats]
            cont = cont.expand(*lead, -1).reshape(-1, cont.shape[-1]) if cont is not None else None
            heads = self.decoder(z.reshape(-1, z.shape[-1]), cats, cont)
            heads = {k: v.reshape(*lead, -1) for k, v in heads.items()}
        else:
            heads = self.decoder(z, cats, cont)
        cell_dispersion = self.gene_likelihood != "poisson" and self.dispersion == "gene-cell"
        log_theta = heads["log_theta"] if cell_dispersion else self._latent_free_log_theta(batch)
        return {"logits": heads["scale"], "zi_logits": heads.get("zi_logits"), "log_theta": log_theta}

    def _latent_free_log_theta(self, batch: MiniBatch) -> torch.Tensor | None:
        """Log inverse dispersion when it does not depend on ``z``: ``(1, G)`` per gene, ``(B, G)``
        per batch or label; None for Poisson and for ``dispersion="gene-cell"`` (decoded from z)."""
        if self.gene_likelihood == "poisson" or self.dispersion == "gene-cell":
            return None
        if self.dispersion == "gene":
            return self.log_theta
        index = batch.batch_index if self.dispersion == "gene-batch" else batch.label_index
        return self.log_theta[index]

    def generative(self, z: torch.Tensor, log_library: torch.Tensor, batch: MiniBatch) -> dict[str, torch.Tensor]:
        """Likelihood parameters for latent ``z`` (``(..., B, n_latent)``).

        Returns ``log_mu`` (log mean counts), ``log_scale`` (log normalised expression, rows sum to
        one in probability space), ``theta`` (None for Poisson) and ``zi_logits`` (None unless
        ZINB), each ``(..., B, G)`` (``theta`` may be ``(1, G)``).
        """
        heads = self._decode(z, batch)
        log_scale = torch.log_softmax(heads["logits"], dim=-1)
        theta = None if heads["log_theta"] is None else torch.exp(heads["log_theta"])
        return {
            "log_scale": log_scale,
            "log_mu": log_scale + log_library,
            "theta": theta,
            "zi_logits": heads["zi_logits"],
        }

    def expression(
        self,
        z: torch.Tensor,
        log_library: torch.Tensor,
        batch: MiniBatch,
        batch_codes: list[int] | None = None,
        expected_counts: bool = False,
    ) -> torch.Tensor:
        """Normalised expression ``exp(log_scale)`` (rows sum to one), or the mean counts
        ``exp(log_mu)`` with ``expected_counts``, ``(..., B, G)``: decoded with the cells' own batch
        (``batch_codes=None``), or with each of ``batch_codes`` in place of it and averaged (the
        counterfactual expression; the encoder's view of the cells is untouched)."""
        key = "log_mu" if expected_counts else "log_scale"
        targets = [batch] if batch_codes is None else [batch.in_batch(code) for code in batch_codes]
        total = torch.exp(self.generative(z, log_library, targets[0])[key])
        for target in targets[1:]:
            total = total + torch.exp(self.generative(z, log_library, target)[key])
        return total if len(targets) == 1 else total / len(targets)

    # -------------------------------------------------------------------- prior of z

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) (nats) summed over the latent axis: ``(..., n_latent) -> (...)``."""
        if self.prior_flow is None:
            return gaussian_log_prob(z, 0.0, 1.0)
        return self.prior_flow.log_prob(z)

    def kl_z(self, inf: dict[str, torch.Tensor]) -> torch.Tensor:
        """KL(q(z | x) || p(z)) per cell, ``(B,)``: analytic for the normal prior; for a flow prior
        the one-sample estimate ``-H[q] - log p(z)`` at ``z = inf["z"]`` (the Gaussian entropy is
        exact, so only ``log p(z)`` is noisy; it is unbiased and reparameterised). For an IAF posterior:
        the one-sample ``log q(z | x) - log p(z)``."""
        if self.posterior_flow is not None:
            return self.posterior_log_prob(inf) - self.prior_log_prob(inf["z"])
        if self.prior_flow is None:
            return gaussian_kl(inf["qz_mean"], inf["qz_var"])
        entropy = 0.5 * (torch.log(2 * math.pi * inf["qz_var"]) + 1.0).sum(-1)
        return -entropy - self.prior_flow.log_prob(inf["z"])

    @torch.no_grad()
    def sample_prior(self, n: int) -> torch.Tensor:
        """``(n, n_latent)`` draws of z from the prior (torch's global generator)."""
        if self.prior_flow is None:
            return torch.randn((n, self.n_latent), device=next(self.parameters()).device)
        return self.prior_flow.sample(n)

    # -------------------------------------------------------------------- objectives

    def reconstruction_loss(self, inf: dict[str, torch.Tensor], batch: MiniBatch) -> torch.Tensor:
        """``(B,)`` -log p(x | z, l) (nats) at the sample ``inf["z"]`` of :meth:`inference`."""
        heads = self._decode(inf["z"], batch)
        return -softmax_count_log_likelihood(
            self.gene_likelihood,
            heads["logits"],
            inf["log_library"],
            heads["log_theta"],
            heads["zi_logits"],
            batch.nz_row,
            batch.nz_col,
            batch.nz_val,
            batch.nz_log_factorial,
            batch.nz_row_ptr,
        )

    def library_kl(self, inf: dict[str, torch.Tensor], batch: MiniBatch) -> torch.Tensor | None:
        """``(B,)`` KL of the latent log library to its per-batch prior; None for an observed library."""
        if self.use_observed_library:
            return None
        index = batch.batch_index
        return gaussian_kl(
            inf["ql_mean"], inf["ql_var"], self.library_log_means[index, None], self.library_log_vars[index, None]
        )

    def loss(self, batch: MiniBatch, kl_weight: float = 1.0) -> LossOutput:
        """Negative ELBO per cell, with the KL of z scaled by ``kl_weight`` in ``loss``: the autograd
        reference (the fused pass of :meth:`loss_and_gradients` is tested equal to it)."""
        inf = self.inference(batch)
        reconstruction = self.reconstruction_loss(inf, batch)
        if self.prior_flow is None and self.posterior_flow is None:
            kl_z = gaussian_kl(inf["qz_mean"], inf["qz_var"])
        else:
            kl_z = self.kl_z(inf)
        kl_l = self.library_kl(inf, batch)
        kl_l = torch.zeros_like(kl_z) if kl_l is None else kl_l
        loss = torch.mean(reconstruction + kl_weight * kl_z + kl_l)
        return LossOutput.variational(loss, reconstruction, kl_z + kl_l)

    def supports_direct_gradients(self) -> bool:
        """Whether the fused pass (:mod:`sclatent.modules.fused_elbo`) can train this configuration
        on its device: scVI's configuration on the CPU in float32 with the native kernels."""
        return fused_elbo.applies(self)

    def loss_and_gradients(self, batch: MiniBatch, kl_weight: float = 1.0) -> LossOutput:
        """:meth:`loss` with the gradient of its ``loss`` in every parameter's ``.grad`` (replacing
        what was there), computed by the fused pass without autograd: the trainer's fast path.

        A minibatch the pass cannot take (one cell, continuous covariates) is differentiated
        through :meth:`loss` by autograd instead, with the same result.
        """
        spec = fused_elbo.fused_spec(self, batch)
        if spec is not None:
            return fused_elbo.fused_loss_and_gradients(spec, batch, kl_weight)
        return self.loss_and_gradients_by_autograd(batch, kl_weight)

    @torch.no_grad()
    def marginal_log_likelihood(
        self, batch: MiniBatch, n_samples: int = 1000, chunk: int | None = None
    ) -> torch.Tensor:
        """Importance-sampled log p(x) per cell (``(B,)``, nats) with q as the proposal.

        ``log p(x) ~= logsumexp_k [log p(x | z_k, l_k) + log p(z_k) + log p(l_k) - log q(z_k, l_k | x)] - log K``,
        with ``log p(z_k)`` the flow's log-density for a flow prior; for an IAF posterior ``z_k`` is the
        flow of a Gaussian draw and ``log q`` includes the flow's log-determinant.
        Samples are drawn ``chunk`` at a time (default: about 4M likelihood entries per pass) and
        processed in one batched decoder pass.
        """
        inf = self.inference(batch)
        if chunk is None:
            # ~4M entries per decoder pass: large enough to be efficient, small enough that the
            # peak memory (a few (chunk, B, G) tensors) stays in the hundreds of MB
            chunk = max(1, min(n_samples, 2**22 // max(1, batch.size * self.n_genes)))
        # the NB coefficient of each count depends on neither z nor l: once per cell, not per sample
        log_theta = self._latent_free_log_theta(batch)
        coefficients = None
        if log_theta is not None:
            coefficients = nb_log_coefficients(log_theta, batch.nz_row, batch.nz_col, batch.nz_val, batch.size)
        # the nonzeros repeated for a full chunk of samples, once: every chunk reads a prefix of them
        folded = self._folded_nonzeros(batch, min(chunk, n_samples), coefficients)
        weights = []
        for start in range(0, n_samples, chunk):
            k = min(chunk, n_samples - start)
            z = inf["qz_mean"] + inf["qz_var"].sqrt() * torch.randn(
                (k, *inf["qz_mean"].shape), device=batch.nz_val.device
            )
            log_q = gaussian_log_prob(z, inf["qz_mean"], inf["qz_var"])
            if self.posterior_flow is not None:
                context = self._posterior_context(inf["qz_mean"], inf["qz_var"])
                z, log_det = self.posterior_flow(z, context)
                log_q = log_q - log_det
            log_pz = gaussian_log_prob(z, 0.0, 1.0) if self.prior_flow is None else self.prior_flow.log_prob(z)
            log_w = log_pz - log_q
            if self.use_observed_library:
                log_library = inf["log_library"].expand(k, -1, -1)
            else:
                log_library = inf["ql_mean"] + inf["ql_var"].sqrt() * torch.randn(
                    (k, *inf["ql_mean"].shape), device=z.device
                )
                index = batch.batch_index
                prior = gaussian_log_prob(
                    log_library, self.library_log_means[index, None], self.library_log_vars[index, None]
                )
                log_w = log_w + prior - gaussian_log_prob(log_library, inf["ql_mean"], inf["ql_var"])
            weights.append(log_w + self._sampled_log_likelihood(z, log_library, batch, folded))
        return torch.logsumexp(torch.cat(weights), dim=0) - math.log(n_samples)

    @staticmethod
    def _folded_nonzeros(
        batch: MiniBatch, n_samples: int, coefficients: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | None]:
        """The minibatch's nonzeros repeated for ``n_samples`` latent samples folded into the cell
        axis (sample ``k`` of cell ``b`` is row ``k * B + b``), sample-major: the first ``k`` samples'
        entries are a prefix of each tensor, so one fold serves every ``k <= n_samples``.
        ``coefficients`` ``(B,)`` (:func:`~sclatent.distributions.nb_log_coefficients`) repeat with them."""
        nnz, n_cells = batch.nz_val.numel(), batch.size
        shift = torch.arange(n_samples, device=batch.nz_val.device)
        row_ptr = (batch.nz_row_ptr[:-1].unsqueeze(0) + (shift * nnz).unsqueeze(1)).reshape(-1)
        return {
            "row": (batch.nz_row.unsqueeze(0) + (shift * n_cells).unsqueeze(1)).reshape(-1),
            "col": batch.nz_col.repeat(n_samples),
            "val": batch.nz_val.repeat(n_samples),
            "log_factorial": batch.nz_log_factorial.repeat(n_samples),
            "row_ptr": torch.cat([row_ptr, row_ptr.new_tensor([n_samples * nnz])]),
            "coefficients": None if coefficients is None else coefficients.repeat(n_samples),
        }

    def _sampled_log_likelihood(
        self, z: torch.Tensor, log_library: torch.Tensor, batch: MiniBatch, folded: dict[str, torch.Tensor | None]
    ) -> torch.Tensor:
        """``(K, B)`` log p(x | z_k, l_k) for ``K`` latent samples ``z`` ``(K, B, n_latent)``.

        The samples are scored from the decoder's logits in one call of the training path's softmax
        likelihood (the fused C kernel on CPU) on ``folded`` (:meth:`_folded_nonzeros` for at least
        ``K`` samples), whose NB coefficient sums, when present, spare the kernel recomputing them
        for every sample.
        """
        n_samples, n_cells = z.shape[0], batch.size
        nnz = n_samples * batch.nz_val.numel()
        heads = self._decode(z, batch)
        log_theta = heads["log_theta"]
        if log_theta is not None and log_theta.numel() > self.n_genes:  # per cell (and sample): one row each
            log_theta = log_theta.expand(n_samples, n_cells, -1).reshape(-1, self.n_genes)
        zi_logits = heads["zi_logits"]
        coefficients = folded["coefficients"]
        flat = softmax_count_log_likelihood(
            self.gene_likelihood,
            heads["logits"].reshape(-1, self.n_genes),
            log_library.expand(n_samples, n_cells, 1).reshape(-1, 1),
            log_theta,
            None if zi_logits is None else zi_logits.reshape(-1, self.n_genes),
            folded["row"][:nnz],
            folded["col"][:nnz],
            folded["val"][:nnz],
            folded["log_factorial"][:nnz],
            folded["row_ptr"][: n_samples * n_cells + 1],
            None if coefficients is None else coefficients[: n_samples * n_cells],
        )
        return flat.reshape(n_samples, n_cells)

    @torch.no_grad()
    def posterior_predictive(
        self, batch: MiniBatch, n_samples: int = 1, decode_batch: MiniBatch | None = None
    ) -> torch.Tensor:
        """Counts drawn from p(x | z, l) with z, l ~ q; ``(n_samples, B, G)``. ``decode_batch``: the
        same cells with other covariates for the decoder (a counterfactual batch); default ``batch``."""
        inf = self.inference(batch, n_samples=n_samples)
        z, log_library = inf["z"], inf["log_library"]
        if n_samples == 1:
            z, log_library = z.unsqueeze(0), log_library.unsqueeze(0)
        gen = self.generative(z, log_library, batch if decode_batch is None else decode_batch)
        theta = gen["theta"].expand_as(gen["log_mu"]) if gen["theta"] is not None else None
        return sample(self.gene_likelihood, torch.exp(gen["log_mu"]), theta, gen["zi_logits"])
