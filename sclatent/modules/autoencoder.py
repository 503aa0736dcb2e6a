"""Count autoencoders as a pure ``torch.nn.Module``: the DCA objective and the classic variants.

Data flow for a cell with counts ``x`` (library ``l = sum(x)``) and batch ``s``::

    u      = log1p(x / l * 1e4)                   log-normalised input     (G)
    u~     = corrupt(u)                           gaussian / salt / masking (+mask) / none
    code   = W_c MLP(u~, s)                       bottleneck, linear       (n_latent)
    rho    = softmax(f(code, s)), pi = g(code, s) decoder heads            (G)
    x_g   ~ ZINB(l * rho_g, theta_g, pi_g)        or NB / Poisson; trained on the raw counts

Regularisers on the same module: ``sparsity`` (L1 on the code), ``contractive`` (squared
Frobenius norm of the encoder's Jacobian d code / d u, estimated with one Hutchinson probe per cell)
and ``tied_weights`` (each decoder matrix is the transpose of its encoder mirror; the zero-inflation
head stays free).

``linear=True`` is PCA as an autoencoder: ``code = W_e (u - m)``, ``u^ = W_d code + m`` trained by
mean squared error on the gene-centred ``u`` (``gene_likelihood="gaussian"``, no non-linearity, no
noise); its decoder spans the top principal subspace at the optimum (Baldi & Hornik 1989).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import nn

from ..contracts import LossOutput, Module
from ..data.loader import MiniBatch
from ..distributions import GeneLikelihood, log_prob, softmax_count_log_likelihood
from ..hyperparameters import Hyperparameters, setting
from ..nn import MLP
from ..nn.blocks import TiedLinear
from ..nn.noise import InputNoise, NoiseKind
from ..nn.regularisers import contractive_penalty

AutoencoderLikelihood = Literal[GeneLikelihood, "gaussian"]
AUTOENCODER_LIKELIHOODS: tuple[str, ...] = get_args(AutoencoderLikelihood)
NORMALISED_TOTAL = 1e4


@dataclass(frozen=True)
class DenoisingAEHyperparameters(Hyperparameters):
    """The count autoencoder's hyperparameters, declared once: read by :class:`AutoencoderModule`,
    :class:`sclatent.model.DenoisingAE` and the ``fit-dae`` command."""

    family: ClassVar[str] = "DenoisingAE"

    n_latent: int = setting(32, "Bottleneck width (DCA: 32).")
    n_hidden: int = setting(64, "Width of the hidden layers of encoder and decoder (DCA: 64).")
    n_layers: int = setting(1, "Hidden layers of encoder and decoder (DCA: 1).")
    dropout_rate: float = setting(
        0.0, "Dropout in the encoder's hidden layers (a regulariser, not the input corruption)."
    )
    gene_likelihood: AutoencoderLikelihood = setting(
        "zinb", "Count distribution of each gene; 'gaussian' (squared error) with linear=True only."
    )
    noise: NoiseKind = setting(
        "masking",
        "Input corruption: 'masking' (entries zeroed with probability noise_rate and the mask concatenated to "
        "the input), 'gaussian' (additive, noise_rate = std on the log scale), 'salt' (entries zeroed, no mask) "
        "or 'none' (plain bottleneck autoencoder).",
    )
    noise_rate: float = setting(0.1, "Strength of the corruption (see noise).")
    sparsity: float = setting(0.0, "Weight of an L1 penalty on the code (sparse autoencoder).")
    contractive: float = setting(
        0.0, "Weight of the squared Frobenius norm of the encoder's Jacobian (contractive autoencoder)."
    )
    tied_weights: bool = setting(False, "Decoder weights are the transposes of the encoder's.")
    linear: bool = setting(
        False,
        "PCA as an autoencoder: linear maps, mean squared error on the gene-centred log-normalised data "
        "(gene_likelihood='gaussian', no noise).",
    )
    encode_covariates: bool = setting(True, "Condition the encoder on batch and covariates (the decoder always is).")
    validation_mask_rate: float = setting(
        0.1, "Fraction of the held-out cells' nonzero counts hidden and predicted for early stopping (0: off)."
    )

    def validate(self) -> None:
        if self.linear != (self.gene_likelihood == "gaussian"):
            raise ValueError(
                "linear=True (PCA as an autoencoder) goes with gene_likelihood='gaussian', and the Gaussian "
                "likelihood only with linear=True."
            )
        if self.sparsity < 0 or self.contractive < 0:
            raise ValueError("sparsity and contractive weights must be >= 0.")
        if not 0.0 <= self.validation_mask_rate < 1.0:
            raise ValueError(f"validation_mask_rate must be in [0, 1), got {self.validation_mask_rate}.")


class AutoencoderModule(Module):
    """(Denoising) autoencoder with a count likelihood.

    Parameters
    ----------
    n_genes
        Number of genes ``G``.
    n_batch, n_cats_per_cov, n_continuous
        Batch and covariates, fed to the decoder (and to the encoder with ``encode_covariates``).
    use_batch_norm
        BatchNorm in the hidden MLPs of encoder and decoder (a module setting only: the model
        class always uses it).
    **hyperparameters
        :class:`DenoisingAEHyperparameters`: ``n_latent``, ``n_hidden``, ``n_layers``,
        ``dropout_rate``; ``gene_likelihood`` (``"zinb"``, ``"nb"``, ``"poisson"`` on the counts, or
        ``"gaussian"``: mean squared error on the centred log-normalised input, the linear AE);
        ``noise``, ``noise_rate`` (input corruption, :class:`sclatent.nn.noise.InputNoise`);
        ``sparsity``, ``contractive`` (weights of the L1 penalty on the code and of the
        contractive penalty, per cell); ``tied_weights``; ``linear`` (PCA as an autoencoder: one
        linear map each way, no hidden layers); ``encode_covariates``; ``validation_mask_rate``
        (in evaluation, also report ``masked_nll``: the negative log-likelihood of a fixed random
        fraction of each cell's nonzero counts, hidden from the input and predicted from the rest;
        the imputation task :class:`sclatent.model.DenoisingAE` early-stops on. 0: off).
    """

    #: the plain objective; :meth:`sclatent.model.DenoisingAE.train` passes ``"masked_nll"`` itself
    default_monitor = "reconstruction"

    def __init__(
        self,
        n_genes: int,
        n_batch: int = 1,
        n_cats_per_cov: list[int] = (),
        n_continuous: int = 0,
        use_batch_norm: bool = True,
        **hyperparameters: Any,
    ) -> None:
        super().__init__()
        settings = DenoisingAEHyperparameters.from_dict(hyperparameters)
        n_latent, n_hidden, n_layers = settings.n_latent, settings.n_hidden, settings.n_layers
        dropout_rate, gene_likelihood, linear = settings.dropout_rate, settings.gene_likelihood, settings.linear
        tied_weights, encode_covariates = settings.tied_weights, settings.encode_covariates
        noise, noise_rate = settings.noise, settings.noise_rate
        self.n_genes, self.n_latent, self.n_batch = n_genes, n_latent, n_batch
        self.gene_likelihood, self.linear, self.tied_weights = gene_likelihood, linear, tied_weights
        self.sparsity, self.contractive = float(settings.sparsity), float(settings.contractive)
        self.encode_covariates = encode_covariates
        self.validation_mask_rate = 0.0 if linear else float(settings.validation_mask_rate)
        self.noise = InputNoise(noise if not linear else "none", noise_rate if not linear else 0.0)
        # gene means of the log-normalised input, for centring the linear AE (set by the model class)
        self.register_buffer("input_mean", torch.zeros(n_genes))
        n_in = self.noise.output_width(n_genes)
        cats = [n_batch, *n_cats_per_cov]
        if linear:
            self.encoder = None
            self.code = nn.Linear(n_genes, n_latent, bias=False)
            self.decoder = None
            self.out = TiedLinear(self.code, n_genes) if tied_weights else nn.Linear(n_latent, n_genes)
            return
        mlp = dict(n_layers=n_layers, use_batch_norm=use_batch_norm, n_continuous=n_continuous)
        self.encoder = MLP(
            n_in,
            n_hidden,
            n_cats_per_cov=cats if encode_covariates else [],
            dropout_rate=dropout_rate,
            **dict(mlp, n_continuous=n_continuous if encode_covariates else 0),
        )
        self.code = nn.Linear(n_hidden, n_latent)
        self.decoder = MLP(n_latent, n_hidden, n_cats_per_cov=cats, dropout_rate=0.0, **mlp)
        n_heads = 2 if gene_likelihood == "zinb" else 1
        if tied_weights:
            # mirror the encoder: decoder layer i is the transpose of encoder layer n_layers - 1 - i
            # (the first decoder layer mirrors the code layer), the scale head mirrors the input layer
            self.decoder.layers[0].linear = TiedLinear(self.code, n_hidden)
            for i in range(1, n_layers):
                self.decoder.layers[i].linear = TiedLinear(self.encoder.layers[n_layers - i].linear, n_hidden)
            self.out = TiedLinear(self.encoder.layers[0].linear, n_genes)
            self.zi_out = nn.Linear(n_hidden, n_genes) if n_heads == 2 else None
        else:
            self.out = nn.Linear(n_hidden, n_heads * n_genes)
            self.zi_out = None
        self.log_theta = nn.Parameter(torch.randn(1, n_genes)) if gene_likelihood in ("zinb", "nb") else None

    # -------------------------------------------------------------------- pieces

    def normalised_input(self, batch: MiniBatch, counts: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, G)`` log1p of counts scaled to 1e4 per cell (centred for the linear AE); ``counts``
        replaces the batch's (dense) counts if given."""
        if counts is None:
            counts, library = batch.counts, batch.library.clamp(min=1.0).unsqueeze(-1)
        else:
            library = counts.sum(-1, keepdim=True).clamp(min=1.0)
        u = torch.log1p(counts * (NORMALISED_TOTAL / library))
        return u - self.input_mean if self.linear else u

    def encode(self, u: torch.Tensor, batch: MiniBatch) -> torch.Tensor:
        """Code ``(B, n_latent)`` of an (already corrupted) input ``u``."""
        if self.linear:
            return self.code(u)
        cats, cont = batch.covariates()
        if not self.encode_covariates:
            cats, cont = [], None
        return self.code(self.encoder(u, cats, cont))

    def decode(self, code: torch.Tensor, batch: MiniBatch) -> dict[str, torch.Tensor | None]:
        """Decoder heads: ``logits`` ``(B, G)`` before the softmax over genes (for the linear AE:
        the reconstructed centred input), ``zi_logits`` (ZINB) and ``log_theta`` ``(1, G)``."""
        if self.linear:
            return {"logits": self.out(code), "zi_logits": None, "log_theta": None}
        cats, cont = batch.covariates()
        h = self.decoder(code, cats, cont)
        if self.zi_out is not None:
            return {"logits": self.out(h), "zi_logits": self.zi_out(h), "log_theta": self.log_theta}
        heads = self.out(h).split(self.n_genes, dim=-1)
        zi = heads[1] if self.gene_likelihood == "zinb" else None
        return {"logits": heads[0], "zi_logits": zi, "log_theta": self.log_theta}

    def expected_counts(self, batch: MiniBatch, include_zero_inflation: bool = False) -> torch.Tensor:
        """``(B, G)`` denoised expected counts at each cell's own library: ``l * rho`` (the mean of
        the NB/Poisson component, DCA's output); times ``1 - pi`` with ``include_zero_inflation``
        (the ZINB's mean). For the linear AE: the reconstruction mapped back to counts,
        ``expm1(u^) * l / 1e4``."""
        code = self.encode(self.noise(self.normalised_input(batch)), batch)
        heads = self.decode(code, batch)
        library = batch.library.clamp(min=1.0).unsqueeze(-1)
        if self.linear:
            u = heads["logits"] + self.input_mean
            return torch.expm1(u).clamp(min=0.0) * (library / NORMALISED_TOTAL)
        mean = torch.softmax(heads["logits"], dim=-1) * library
        if include_zero_inflation and heads["zi_logits"] is not None:
            mean = mean * torch.sigmoid(-heads["zi_logits"])
        return mean

    @torch.no_grad()
    def masked_nll(self, batch: MiniBatch, rate: float | None = None, seed: int = 0) -> torch.Tensor:
        """``(B,)`` negative log-likelihood of hidden nonzero counts given the visible ones.

        A fraction ``rate`` (default ``validation_mask_rate``) of the batch's nonzero entries,
        drawn with a fixed ``seed`` (the same entries every epoch for the same cells), is zeroed in
        the input; the model predicts them from the rest at the cell's visible total count, as
        when imputing. Nats per cell, summed over its hidden entries.
        """
        rate = self.validation_mask_rate if rate is None else rate
        generator = torch.Generator(device=batch.nz_val.device).manual_seed(seed)
        hidden = torch.rand(batch.nz_val.shape, generator=generator, device=batch.nz_val.device) < rate
        rows, cols, values = batch.nz_row[hidden], batch.nz_col[hidden], batch.nz_val[hidden]
        visible = batch.counts.clone()
        visible[rows, cols] = 0.0
        code = self.encode(self.noise(self.normalised_input(batch, visible)), batch)
        heads = self.decode(code, batch)
        library = visible.sum(-1).clamp(min=1.0)
        mu = torch.softmax(heads["logits"], dim=-1)[rows, cols] * library[rows]
        theta = (
            None if heads["log_theta"] is None else torch.exp(heads["log_theta"]).expand_as(heads["logits"])[rows, cols]
        )
        zi = None if heads["zi_logits"] is None else heads["zi_logits"][rows, cols]
        per_entry = -log_prob(self.gene_likelihood, values, mu, theta, zi)
        return torch.zeros(batch.size, dtype=per_entry.dtype, device=per_entry.device).index_add_(0, rows, per_entry)

    # -------------------------------------------------------------------- objective

    def loss(self, batch: MiniBatch, kl_weight: float = 1.0) -> LossOutput:
        """Per-cell negative log-likelihood of the clean counts given the corrupted input
        (``reconstruction``; for the linear AE half the squared error), plus the penalties (``l1``
        with ``sparsity``, ``contractive`` in training with ``contractive``) and in evaluation
        ``masked_nll`` (with ``validation_mask_rate``). No ELBO; ``kl_weight`` is unused (no KL)."""
        u = self.noise(self.normalised_input(batch))
        penalise_jacobian = self.contractive > 0 and self.training
        if penalise_jacobian:
            u = u.detach().requires_grad_(True)
        code = self.encode(u, batch)
        heads = self.decode(code, batch)
        if self.linear:
            target = self.normalised_input(batch)
            reconstruction = 0.5 * ((heads["logits"] - target) ** 2).sum(-1)
        else:
            log_library = torch.log(batch.library.clamp(min=1.0)).unsqueeze(-1)
            reconstruction = -softmax_count_log_likelihood(
                self.gene_likelihood,
                heads["logits"],
                log_library,
                heads["log_theta"],
                heads["zi_logits"],
                batch.nz_row,
                batch.nz_col,
                batch.nz_val,
                batch.nz_log_factorial,
                batch.nz_row_ptr,
            )
        total = reconstruction
        terms = {"reconstruction": reconstruction}
        if self.sparsity > 0:
            terms["l1"] = code.abs().sum(-1)
            total = total + self.sparsity * terms["l1"]
        if penalise_jacobian:
            # Hutchinson: E_v ||v^T J||^2 = ||J||_F^2 for v ~ N(0, I); one probe per cell
            terms["contractive"] = contractive_penalty(code, u)
            total = total + self.contractive * terms["contractive"]
        if not self.training and self.validation_mask_rate > 0:
            terms["masked_nll"] = self.masked_nll(batch)
        return LossOutput(loss=total.mean(), terms=terms)
