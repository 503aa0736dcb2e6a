"""The semi-supervised count VAE (scANVI's model, Kingma et al. 2014's M1+M2) as a pure ``torch.nn.Module``.

Generative model, for a cell with batch ``s`` (labels ``y`` over ``K`` classes)::

    y   ~ Cat(1/K, ..., 1/K)
    z2  ~ N(0, I)                                          (n_latent)
    z1  ~ N(mu(z2, y), diag sigma^2(z2, y))                (n_latent; M2 on top of M1)
    x_g ~ ZINB(l * rho_g(z1, s), theta_g, pi_g(z1, s))     (or NB / Poisson; the count VAE's decoder)

Inference: ``q(z1 | x, s)`` the count VAE's encoder, ``q(y | z1)`` a classifier, ``q(z2 | z1, y)``
a Gaussian encoder. With one sample ``z1 ~ q(z1 | x)`` and, for every class ``k``, one sample
``z2 ~ q(z2 | z1, k)``, write

    KL_k = [log q(z1 | x) - log p(z1 | z2, k)] + KL(q(z2 | z1, k) || N(0, I))

(a one-sample estimate of ``KL(q(z1, z2 | x, k) || p(z1, z2 | k))``). Then, per cell,

    labelled (x, y):  log p(x, y) >= log p(x | z1) - KL_y + log p(y)
    unlabelled x:     log p(x)    >= log p(x | z1) - sum_k q(k | z1) KL_k - KL(q(y | z1) || Cat(1/K))

(the second bound marginalises ``y`` in closed form over the classifier's probabilities). The
objective is the mean negative bound over the minibatch (the KL part scaled by ``kl_weight`` in
warm-up) plus ``classification_ratio`` times the classifier's cross-entropy on labelled cells,
``-log q(y | E[z1 | x])`` (scANVI's classification loss, weight 50 by default, on the posterior
mean). In training, the labelled cells of that term come from a second minibatch of labelled
cells drawn alongside every minibatch (:class:`sclatent.data.labelled.LabelledData`, as scANVI
does), so the classifier learns in every step however rare labels are; without one (evaluation),
from the labelled cells of the minibatch itself.

Predictions are ``softmax(f(E[z1 | x]) / T)`` with a temperature ``T`` (a buffer, 1 until the
model class fits it on held-out labelled cells: temperature scaling, Guo et al. 2017).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..contracts import LossOutput, Module
from ..data.loader import MiniBatch
from ..distributions import gaussian_kl, gaussian_log_prob
from ..hyperparameters import setting
from ..nn import MLP, GaussianEncoder
from . import fused_elbo, fused_ssvae
from .vae import CountVAEHyperparameters, VAEModule


@dataclass(frozen=True)
class SemiSupervisedVAEHyperparameters(CountVAEHyperparameters):
    """The semi-supervised VAE's hyperparameters: the count VAE's core (encoder, decoder,
    likelihood: the same names, so a trained :class:`~sclatent.model.VAE` hands its weights over)
    plus the classifier's."""

    family: ClassVar[str] = "SemiSupervisedVAE"

    classification_ratio: float = setting(
        50.0, "Weight of the classifier's cross-entropy on labelled cells (scANVI's classification_ratio).", minimum=0.0
    )
    classifier_n_hidden: int = setting(128, "Width of the classifier q(y | z1)'s hidden layers.", minimum=1)
    classifier_n_layers: int = setting(1, "Hidden layers of the classifier (0: a linear classifier).", minimum=0)
    classifier_dropout_rate: float = setting(0.1, "Dropout probability in the classifier.", minimum=0.0, maximum=0.99)

    def validate(self) -> None:
        if self.dispersion == "gene-label":
            raise ValueError(
                "dispersion='gene-label' is not available in the semi-supervised VAE: most cells have no label "
                "to pick a dispersion by. Use 'gene', 'gene-batch' or 'gene-cell'."
            )


#: The fields of the count VAE inside (what :class:`VAEModule` takes).
_CORE_FIELDS = tuple(item.name for item in fields(CountVAEHyperparameters))


class SemiSupervisedVAEModule(Module):
    """scANVI-style semi-supervised VAE for counts (see the module docstring for the maths).

    Parameters
    ----------
    n_genes
        Number of genes ``G``.
    n_labels
        Number of classes ``K`` (unlabelled cells carry the code -1).
    n_batch, n_cats_per_cov, n_continuous
        Batch and covariates, as in :class:`VAEModule`.
    library_log_means, library_log_vars
        ``(n_batch,)`` prior of a latent log library.
    **hyperparameters
        :class:`SemiSupervisedVAEHyperparameters`.

    Attributes
    ----------
    vae
        The count VAE (M1): ``q(z1 | x)``, ``p(x | z1)``; its state dict is a :class:`VAEModule`'s,
        so a trained VAE's weights load into it.
    classifier
        ``q(y | z1)``: logits ``(B, K)``.
    z2_encoder, z1_decoder
        ``q(z2 | z1, y)`` and ``p(z1 | z2, y)`` (M2), the class fed as a categorical covariate.
    """

    default_monitor = "elbo"

    def __init__(
        self,
        n_genes: int,
        n_labels: int,
        n_batch: int = 1,
        n_cats_per_cov: list[int] = (),
        n_continuous: int = 0,
        library_log_means: np.ndarray | None = None,
        library_log_vars: np.ndarray | None = None,
        **hyperparameters: Any,
    ) -> None:
        super().__init__()
        settings = SemiSupervisedVAEHyperparameters.from_dict(hyperparameters)
        if n_labels < 2:
            raise ValueError(f"a classifier needs at least two classes, got n_labels={n_labels}.")
        core = {name: getattr(settings, name) for name in _CORE_FIELDS}
        self.vae = VAEModule(
            n_genes,
            n_batch=n_batch,
            n_cats_per_cov=n_cats_per_cov,
            n_continuous=n_continuous,
            library_log_means=library_log_means,
            library_log_vars=library_log_vars,
            **core,
        )
        self.n_labels, self.n_latent = int(n_labels), settings.n_latent
        self.classification_ratio = float(settings.classification_ratio)
        latent, hidden = settings.n_latent, settings.n_hidden
        if settings.classifier_n_layers:
            # no BatchNorm: trained for a few epochs from scratch, its running statistics would lag
            # the batch statistics it trains with, and eval-mode predictions would come out soft
            body = MLP(
                latent,
                settings.classifier_n_hidden,
                n_layers=settings.classifier_n_layers,
                dropout_rate=settings.classifier_dropout_rate,
                use_batch_norm=False,
            )
            self.classifier = nn.Sequential(body, nn.Linear(settings.classifier_n_hidden, self.n_labels))
        else:
            self.classifier = nn.Sequential(nn.Linear(latent, self.n_labels))
        self.z2_encoder = GaussianEncoder(
            latent, latent, hidden, n_cats_per_cov=[self.n_labels], dropout_rate=settings.dropout_rate
        )
        self.z1_decoder = GaussianEncoder(latent, latent, hidden, n_cats_per_cov=[self.n_labels], dropout_rate=0.0)
        # log T of the predictions' temperature (fitted by the model class; 0 = untempered)
        self.register_buffer("log_temperature", torch.zeros(()))

    # -------------------------------------------------------------------- query mapping

    def add_batch_categories(
        self,
        n_new: int,
        library_log_means: np.ndarray | None = None,
        library_log_vars: np.ndarray | None = None,
    ) -> dict[str, torch.Tensor]:
        """Grow the count VAE inside by ``n_new`` batches (:meth:`sclatent.modules.VAEModule.add_batch_categories`);
        the classifier and M2 read ``z1`` only, not the batch, and do not change.

        Returns
        -------
        dict[str, torch.Tensor]
            For every grown parameter, its name in ``named_parameters()`` (``"vae. ..."``) and a
            bool mask of its shape, True on the entries of the new batches.
        """
        masks = self.vae.add_batch_categories(n_new, library_log_means, library_log_vars)
        return {f"vae.{name}": mask for name, mask in masks.items()}

    def classifier_shifts(self) -> list[nn.Parameter]:
        """The classifier's hidden-layer biases: a per-unit shift of its hidden activations (the
        counterpart, in this BatchNorm-free classifier, of a BatchNorm's shift). Query mapping
        trains them on the query's unlabelled objective while the rest of the classifier stays
        frozen (``load_query_data(adapt_classifier=True)``); empty for a linear classifier."""
        if len(self.classifier) == 1:  # linear: its only bias sets the class log-odds, not a shift
            return []
        return [layer.linear.bias for layer in self.classifier[0].layers]

    # -------------------------------------------------------------------- pieces

    def class_logits(self, z1: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` logits of ``q(y | z1)`` (no temperature)."""
        return self.classifier(z1)

    @torch.no_grad()
    def latent_mean(self, batch: MiniBatch) -> torch.Tensor:
        """``(B, n_latent)`` posterior mean of z1 (eval mode expected)."""
        return self.vae.inference(batch)["qz_mean"]

    @torch.no_grad()
    def predict_logits(self, batch: MiniBatch) -> torch.Tensor:
        """``(B, K)`` tempered logits of the posterior mean: ``f(E[z1 | x]) / T``."""
        return self.class_logits(self.latent_mean(batch)) / torch.exp(self.log_temperature)

    def _m1(self, batch: MiniBatch) -> dict[str, torch.Tensor]:
        """The count VAE's part of a training step: ``reconstruction`` (B,), the sample ``z`` and
        ``qz_mean``, ``qz_var`` (and ``ql_mean``, ``ql_var`` for a latent library).

        In the count VAE's fused configuration (:func:`sclatent.modules.fused_elbo.applies`) one
        autograd node computes it with the fused kernels and takes back the gradients the rest of
        the objective sends into ``z``, ``qz_mean`` and ``qz_var`` (:func:`~sclatent.modules.fused_elbo.fused_pass`;
        the same numbers and random draws as the autograd path, to float32 rounding).
        """
        spec = fused_elbo.fused_spec(self.vae, batch)
        if spec is not None:
            return fused_elbo.fused_pass(spec, batch)
        inf = self.vae.inference(batch)
        inf["reconstruction"] = self.vae.reconstruction_loss(inf, batch)
        return inf

    def _class_kls(self, z1: torch.Tensor, log_q_z1: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` one-sample ``KL_k`` for every cell and class (see the module docstring)."""
        n_cells, n_labels = z1.shape[0], self.n_labels
        # every cell paired with every class: row k * B + b is (cell b, class k)
        z1_all = z1.repeat(n_labels, 1)
        classes = torch.arange(n_labels, device=z1.device).repeat_interleave(n_cells)
        m2, v2, z2 = self.z2_encoder(z1_all, [classes])
        m1, v1, _ = self.z1_decoder(z2, [classes])
        kl_z1 = log_q_z1.repeat(n_labels) - gaussian_log_prob(z1_all, m1, v1)
        kl = kl_z1 + gaussian_kl(m2, v2)
        return kl.view(n_labels, n_cells).t()

    def classification_loss(self, batch: MiniBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy and accuracy of the classifier on labelled cells: those of
        ``batch.labelled`` if attached, else the minibatch's own (zeros when it has none). The
        cross-entropy is differentiable (autograd) whenever there were labelled cells."""
        source = batch.labelled if batch.labelled is not None else batch
        labels = source.label_index
        labelled = labels >= 0
        zero = torch.zeros((), device=labels.device)
        if not bool(labelled.any()):
            return zero, zero
        qz_mean = self.vae.inference(source)["qz_mean"]
        logits = self.class_logits(qz_mean[labelled])
        targets = labels[labelled]
        accuracy = (logits.argmax(-1) == targets).float().mean()
        return F.cross_entropy(logits, targets), accuracy.detach()

    # -------------------------------------------------------------------- objective

    def loss(self, batch: MiniBatch, kl_weight: float = 1.0) -> LossOutput:
        """Negative bound per cell (labelled: ``log p(x, y)``; unlabelled: ``log p(x)``) plus the
        weighted classification term. Terms: ``reconstruction``, ``kl`` (their negated sum is the
        per-cell bound), ``classification`` (the mean cross-entropy on labelled cells, repeated per
        cell) and ``accuracy`` (the classifier's, on the same cells)."""
        inf = self._m1(batch)
        z1, reconstruction = inf["z"], inf["reconstruction"]
        log_q_z1 = gaussian_log_prob(z1, inf["qz_mean"], inf["qz_var"])
        class_kls = self._class_kls(z1, log_q_z1)
        log_prior_y = -math.log(self.n_labels)
        labels = batch.label_index
        labelled = labels >= 0
        log_q_y = torch.log_softmax(self.class_logits(z1), dim=-1)
        q_y = log_q_y.exp()
        unlabelled_kl = (q_y * class_kls).sum(-1) + (q_y * (log_q_y - log_prior_y)).sum(-1)
        labelled_kl = class_kls.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1) - log_prior_y
        kl = torch.where(labelled, labelled_kl, unlabelled_kl)
        kl_l = None if "ql_mean" not in inf else self.vae.library_kl(inf, batch)
        kl_l = torch.zeros_like(kl) if kl_l is None else kl_l
        cross_entropy, accuracy = self.classification_loss(batch)
        loss = torch.mean(reconstruction + kl_weight * kl + kl_l) + self.classification_ratio * cross_entropy
        per_cell = torch.ones_like(reconstruction)
        extra = {"classification": per_cell * cross_entropy.detach(), "accuracy": per_cell * accuracy}
        return LossOutput.variational(loss, reconstruction, kl + kl_l, extra)

    def supports_direct_gradients(self) -> bool:
        """Whether the hand-written pass (:mod:`sclatent.modules.fused_ssvae`) can train this
        configuration: the count VAE's fused configuration on the CPU in float32 with the native
        kernels, and the default classifier (one hidden layer)."""
        return fused_ssvae.applies(self)

    def loss_and_gradients(self, batch: MiniBatch, kl_weight: float = 1.0) -> LossOutput:
        """:meth:`loss` with the gradient of its ``loss`` in every parameter's ``.grad`` (replacing
        what was there), computed by hand (:mod:`sclatent.modules.fused_ssvae`): the trainer's fast
        path. A minibatch the pass cannot take (one cell, continuous covariates) goes through autograd."""
        specs = fused_ssvae.specs(self, batch)
        if specs is None:
            return self.loss_and_gradients_by_autograd(batch, kl_weight)
        return fused_ssvae.loss_and_gradients(self, *specs, batch, kl_weight)
