"""Masked-gene pretraining (BERT-style) as a pure ``torch.nn.Module``.

Data flow for a cell with counts ``x`` (``G`` genes) in pretraining::

    M      = exactly round(mask_rate * G) genes drawn uniformly, zeros included    (G,) bool
    x_vis  = x with the genes in M set to 0;  l_vis = sum(x_vis)                    visible library
    u      = log1p(x_vis / l_vis * 1e4)                                            log-normalised
    z      = encoder(u, M)                                                         cell embedding
    rho    = softmax(decoder(z, s)),  x_g ~ NB(l_vis * rho_g, theta_g)  for g in M (or ZINB)
    loss   = - sum_{g in M} log p(x_g | z)                                         nats per cell

Two encoders:

* ``"mlp"``: an MLP over ``[u, M]`` (the mask is concatenated, so the encoder can tell a hidden
  gene from an observed zero), then a linear map to ``n_latent``;
* ``"transformer"``: the cell as a set of tokens, its ``n_tokens`` highest visible genes
  (Geneformer's rank selection, scGPT's value tokens): token = gene embedding + an MLP of the
  gene's value ``u_g``; a pre-norm transformer encoder; the mean of the token outputs (padding
  excluded) mapped to ``n_latent``. Hidden genes are never tokens (ranks are taken after
  masking), so the selection leaks nothing about them.

Why the *visible* library scales the mean: the full library would tell the decoder the sum of the
hidden counts. Why a fixed number of hidden genes per cell rather than independent coin flips:
every cell's loss sums over the same number of entries, so cells weigh equally, and the per-cell
count is exact (``n_masked``). The BERT 80/10/10 replacement is not used: hidden entries are always
zeroed and flagged (the transformer simply does not see them).

Fine-tuning (``objective = "classify"``) puts a linear classifier on ``z``; the loss is the
cross-entropy of the label codes in ``batch.label_index`` (cells coded ``-1`` are unlabelled and
must not be passed).

Normalisation: the encoders use no BatchNorm (LayerNorm in the transformer, none in the MLP):
batch statistics would be re-estimated on the handful of labelled cells of a fine-tuning run
(and on a different dataset), so prediction would use statistics of five cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import nn

from ..contracts import LossOutput, Module
from ..data.loader import MiniBatch
from ..distributions import GeneLikelihood, log_prob
from ..hyperparameters import Hyperparameters, setting
from ..nn import MLP, CountDecoder
from ..nn.blocks import Dropout
from ..nn.masking import draw_feature_mask, n_masked_features

MaskedEncoder = Literal["mlp", "transformer"]
MASKED_ENCODERS: tuple[str, ...] = get_args(MaskedEncoder)
NORMALISED_TOTAL = 1e4
#: Seed of the fixed mask of evaluation mode (validation loss): the same genes every epoch
EVAL_MASK_SEED = 1234


# the masks are generic (k of n features per row); the gene names are this module's public API
n_masked_genes = n_masked_features
draw_gene_mask = draw_feature_mask


class TopGeneTransformer(nn.Module):
    """Cell embedding from its top expressed genes as tokens (gene embedding + value embedding).

    Parameters
    ----------
    n_genes
        Vocabulary size ``G``.
    n_out
        Width of the cell embedding.
    n_tokens
        Tokens per cell: its highest genes by (visible) value; fewer when it has fewer nonzero
        genes (the rest are padding, ignored by attention and pooling).
    d_model, n_heads, n_layers
        Transformer size (pre-norm layers, feed-forward width ``2 * d_model``).
    dropout_rate
        Dropout on the pooled embedding (none inside the layers: see the comment in ``__init__``).
    """

    def __init__(
        self,
        n_genes: int,
        n_out: int,
        n_tokens: int = 64,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        dropout_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}).")
        self.n_tokens = min(n_tokens, n_genes)
        self.gene_embedding = nn.Embedding(n_genes, d_model)
        # scGPT's continuous value encoder: a small MLP of the scalar log-normalised value
        self.value_embedding = nn.Sequential(nn.Linear(1, d_model), nn.ReLU(), nn.Linear(d_model, d_model))
        # no dropout inside the layers: on CPU torch's dropout masks on the attention weights and
        # activations cost as much as the layer itself (measured: 2x per step); the hidden genes
        # already regularise, and the pooled embedding gets the core's (fast) dropout instead
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout_rate)
        self.out = nn.Linear(d_model, n_out)

    def tokens(self, u: torch.Tensor, hidden: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(genes, values, valid)``, each ``(B, n_tokens)``: the top visible genes of each cell."""
        score = u if hidden is None else u.masked_fill(hidden, -1.0)  # hidden genes rank last
        values, genes = score.topk(self.n_tokens, dim=1)
        valid = values > 0
        valid[:, 0] = True  # a cell with no visible counts keeps one (zero-valued) token: no empty softmax
        return genes, values.clamp(min=0.0), valid

    def forward(self, u: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, G)`` log-normalised visible values (and the ``(B, G)`` hidden mask) -> ``(B, n_out)``."""
        genes, values, valid = self.tokens(u, hidden)
        h = self.gene_embedding(genes) + self.value_embedding(values.unsqueeze(-1))
        h = self.norm(self.transformer(h, src_key_padding_mask=~valid))
        weights = valid.to(h.dtype).unsqueeze(-1)
        pooled = (h * weights).sum(1) / weights.sum(1)
        return self.out(self.dropout(pooled))


@dataclass(frozen=True)
class MaskedGeneModelHyperparameters(Hyperparameters):
    """The masked-gene model's hyperparameters, declared once: read by :class:`MaskedGeneModule`,
    :class:`sclatent.model.MaskedGeneModel` and the ``fit-masked`` command."""

    family: ClassVar[str] = "MaskedGeneModel"

    encoder: MaskedEncoder = setting(
        "mlp",
        "'mlp' (an MLP over the masked, log-normalised expression and the mask) or 'transformer' (tokens = the "
        "cell's n_tokens top visible genes, each a learned gene embedding plus a value embedding; mean-pooled).",
    )
    n_latent: int = setting(32, "Width of the cell embedding.")
    n_hidden: int = setting(128, "Hidden width of the MLP encoder and of the decoder.")
    n_layers: int = setting(1, "Hidden layers of the MLP encoder and of the decoder.")
    dropout_rate: float = setting(0.1, "Dropout in the encoder (MLP hidden layers; transformer: pooled embedding).")
    gene_likelihood: GeneLikelihood = setting(
        "nb",
        "Distribution of the hidden counts ('nb' by default: UMI counts need no zero inflation, and it is one "
        "head fewer).",
    )
    mask_rate: float = setting(
        0.15, "Fraction of genes hidden per cell: exactly round(mask_rate * n_genes), drawn uniformly, zeros included."
    )
    n_tokens: int = setting(64, "Transformer encoder: tokens per cell (its highest visible genes).")
    d_model: int = setting(64, "Transformer encoder: width of the tokens.")
    n_heads: int = setting(4, "Transformer encoder: attention heads (must divide d_model).")
    n_transformer_layers: int = setting(2, "Transformer encoder: layers.")
    classifier: dict | None = setting(
        None,
        "The fine-tuned classifier head's labels_key and classes (written by fine_tune; None before).",
        cli=False,
        module=False,
    )

    def validate(self) -> None:
        if not 0.0 < self.mask_rate < 1.0:
            raise ValueError(f"mask_rate must be in (0, 1), got {self.mask_rate}.")
        if self.encoder == "transformer" and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}).")


class MaskedGeneModule(Module):
    """Masked-gene model: encoder, count decoder for the hidden genes, optional classifier head.

    Parameters
    ----------
    n_genes
        Number of genes ``G``.
    n_batch, n_cats_per_cov, n_continuous
        Batch and covariates, fed to the decoder only (the embedding is left free of them).
    n_classes
        Size of the classifier head (0: none yet; see :meth:`set_classifier`).
    **hyperparameters
        :class:`MaskedGeneModelHyperparameters` that the module takes (``classifier`` is the
        model's): ``encoder`` (``"mlp"`` or ``"transformer"``, see the module docstring),
        ``n_latent`` (width of the cell embedding ``z``), ``n_hidden`` and ``n_layers`` (MLP
        encoder and decoder), ``dropout_rate`` (encoder), ``gene_likelihood`` (``"nb"``, ``"zinb"``
        or ``"poisson"`` for the hidden counts), ``mask_rate`` (exactly :func:`n_masked_genes`
        genes hidden per cell), ``n_tokens``, ``d_model``, ``n_heads``, ``n_transformer_layers``
        (transformer encoder).
    """

    #: pretraining's objective: the held-out NLL of the hidden counts
    default_monitor = "reconstruction"

    def __init__(
        self,
        n_genes: int,
        n_batch: int = 1,
        n_cats_per_cov: list[int] = (),
        n_continuous: int = 0,
        n_classes: int = 0,
        **hyperparameters: Any,
    ) -> None:
        super().__init__()
        settings = MaskedGeneModelHyperparameters.from_dict(hyperparameters)
        n_latent, n_hidden, n_layers = settings.n_latent, settings.n_hidden, settings.n_layers
        encoder = settings.encoder
        dropout_rate, gene_likelihood, mask_rate = settings.dropout_rate, settings.gene_likelihood, settings.mask_rate
        n_tokens, d_model, n_heads = settings.n_tokens, settings.d_model, settings.n_heads
        n_transformer_layers = settings.n_transformer_layers
        if n_genes < 2:
            raise ValueError("masked-gene pretraining needs at least two genes (one hidden, one visible).")
        self.n_genes, self.n_latent, self.encoder_kind = n_genes, n_latent, encoder
        self.gene_likelihood, self.mask_rate = gene_likelihood, float(mask_rate)
        # what ``loss`` optimises: "masked" (pretraining) or "classify" (fine-tuning); set by the model
        self.objective = "masked"
        # fine-tuning: hide genes from the input in training mode too (an augmentation)
        self.mask_when_classifying = True
        if encoder == "mlp":
            self.encoder = MLP(
                2 * n_genes, n_hidden, n_layers=n_layers, dropout_rate=dropout_rate, use_batch_norm=False
            )
            self.code = nn.Linear(n_hidden, n_latent)
        else:
            self.encoder = TopGeneTransformer(
                n_genes, n_latent, n_tokens, d_model, n_heads, n_transformer_layers, dropout_rate
            )
            self.code = None
        heads = ("logits", "zi_logits") if gene_likelihood == "zinb" else ("logits",)
        self.decoder = CountDecoder(
            n_latent,
            n_genes,
            heads,
            n_hidden=n_hidden,
            n_cats_per_cov=[n_batch, *n_cats_per_cov],
            n_continuous=n_continuous,
            n_layers=n_layers,
            dropout_rate=0.0,
        )
        self.log_theta = nn.Parameter(torch.zeros(1, n_genes)) if gene_likelihood != "poisson" else None
        self.classifier: nn.Linear | None = None
        if n_classes:
            self.set_classifier(n_classes)

    # -------------------------------------------------------------------- pieces

    def set_classifier(self, n_classes: int) -> None:
        """A fresh linear head ``z -> n_classes`` logits (replacing any previous one)."""
        if n_classes < 2:
            raise ValueError(f"a classifier needs at least two classes, got {n_classes}.")
        self.classifier = nn.Linear(self.n_latent, n_classes).to(next(self.decoder.parameters()).device)

    def draw_mask(self, batch: MiniBatch) -> torch.Tensor:
        """``(B, G)`` hidden genes: random in training mode, a fixed draw in evaluation mode."""
        device = batch.nz_val.device
        generator = None
        if not self.training:
            generator = torch.Generator(device=device).manual_seed(EVAL_MASK_SEED)
        return draw_gene_mask(batch.size, self.n_genes, self.mask_rate, generator, device)

    @staticmethod
    def visible(counts: torch.Tensor, hidden: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u, l_vis)``: log-normalised visible counts ``(B, G)`` and the visible library ``(B,)``."""
        x = counts if hidden is None else counts.masked_fill(hidden, 0.0)
        library = x.sum(-1).clamp(min=1.0)
        return torch.log1p(x * (NORMALISED_TOTAL / library.unsqueeze(-1))), library

    def encode(self, counts: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, n_latent)`` embedding of ``(B, G)`` counts with the ``hidden`` genes (bool) removed."""
        u, _ = self.visible(counts, hidden)
        if self.encoder_kind == "transformer":
            return self.encoder(u, hidden)
        flag = torch.zeros_like(u) if hidden is None else hidden.to(u.dtype)
        return self.code(self.encoder(torch.cat([u, flag], dim=-1)))

    def masked_nll(self, batch: MiniBatch, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(nll, z)``: ``(B,)`` negative log-likelihood of the hidden counts (nats, summed over the
        cell's hidden genes, zeros included) given the visible ones, and the ``(B, n_latent)`` embedding."""
        counts = batch.counts
        z = self.encode(counts, hidden)
        cats, cont = batch.covariates()
        heads = self.decoder(z, cats, cont)
        _, library = self.visible(counts, hidden)
        rows, cols = hidden.nonzero(as_tuple=True)
        log_rho = torch.log_softmax(heads["logits"], dim=-1)[rows, cols]
        mu = torch.exp(log_rho) * library[rows]
        theta = None if self.log_theta is None else torch.exp(self.log_theta[0, cols])
        zi = heads["zi_logits"][rows, cols] if "zi_logits" in heads else None
        per_entry = -log_prob(self.gene_likelihood, counts[rows, cols], mu, theta, zi)
        nll = torch.zeros(batch.size, dtype=per_entry.dtype, device=per_entry.device).index_add_(0, rows, per_entry)
        return nll, z

    def class_logits(self, counts: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, n_classes)`` classifier logits."""
        if self.classifier is None:
            raise RuntimeError("This module has no classifier head; call set_classifier(n_classes) first.")
        return self.classifier(self.encode(counts, hidden))

    # -------------------------------------------------------------------- objective

    def loss(self, batch: MiniBatch, kl_weight: float = 1.0) -> LossOutput:
        """Pretraining: per-cell NLL of the hidden counts (``reconstruction``, nats). Fine-tuning
        (``objective == "classify"``): per-cell ``cross_entropy`` (nats) and ``accuracy`` (0/1 per
        cell). No ELBO; ``kl_weight`` is unused (no KL term)."""
        if self.objective == "classify":
            hidden = self.draw_mask(batch) if self.training and self.mask_when_classifying else None
            logits = self.class_logits(batch.counts, hidden)
            labels = batch.label_index
            ce = nn.functional.cross_entropy(logits, labels, reduction="none")
            accuracy = (logits.argmax(-1) == labels).to(ce.dtype)
            return LossOutput(loss=ce.mean(), terms={"cross_entropy": ce, "accuracy": accuracy})
        nll, _ = self.masked_nll(batch, self.draw_mask(batch))
        return LossOutput(loss=nll.mean(), terms={"reconstruction": nll})
