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

import torch
from torch import nn

from ..data.loader import MiniBatch
from ..distributions import GENE_LIKELIHOODS, log_prob
from ..nn import MLP, CountDecoder
from ..nn.blocks import Dropout
from ._base import LossOutput

MASKED_ENCODERS: tuple[str, ...] = ("mlp", "transformer")
NORMALISED_TOTAL = 1e4
# seed of the fixed mask of evaluation mode (validation loss): the same genes every epoch
EVAL_MASK_SEED = 1234


def n_masked_genes(n_genes: int, mask_rate: float) -> int:
    """Genes hidden per cell: ``round(mask_rate * n_genes)``, at least 1 and at most ``n_genes - 1``."""
    return int(min(n_genes - 1, max(1, round(mask_rate * n_genes))))


def draw_gene_mask(
    n_cells: int, n_genes: int, mask_rate: float, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """``(n_cells, n_genes)`` bool mask with exactly :func:`n_masked_genes` True entries per row.

    Each row's hidden genes are a uniform random subset (the top-k of i.i.d. uniform scores), drawn
    regardless of the counts: zeros are hidden as often as nonzeros.
    """
    k = n_masked_genes(n_genes, mask_rate)
    scores = torch.rand(n_cells, n_genes, generator=generator, device=device)
    mask = torch.zeros(n_cells, n_genes, dtype=torch.bool, device=scores.device)
    return mask.scatter_(1, scores.topk(k, dim=1).indices, True)


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


class MaskedGeneModule(nn.Module):
    """Masked-gene model: encoder, count decoder for the hidden genes, optional classifier head.

    Parameters
    ----------
    n_genes
        Number of genes ``G``.
    n_batch, n_cats_per_cov, n_continuous
        Batch and covariates, fed to the decoder only (the embedding is left free of them).
    encoder
        ``"mlp"`` or ``"transformer"`` (see the module docstring).
    n_latent
        Width of the cell embedding ``z``.
    n_hidden, n_layers
        Hidden width and depth of the MLP encoder and of the decoder.
    dropout_rate
        Dropout in the encoder (MLP hidden layers; the transformer's pooled embedding).
    gene_likelihood
        ``"nb"``, ``"zinb"`` or ``"poisson"`` for the hidden counts.
    mask_rate
        Fraction of each cell's genes hidden (exactly :func:`n_masked_genes` per cell).
    n_tokens, d_model, n_heads, n_transformer_layers
        Transformer encoder settings.
    n_classes
        Size of the classifier head (0: none yet; see :meth:`set_classifier`).
    """

    def __init__(
        self,
        n_genes: int,
        n_batch: int = 1,
        n_cats_per_cov: list[int] = (),
        n_continuous: int = 0,
        encoder: str = "mlp",
        n_latent: int = 32,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        gene_likelihood: str = "nb",
        mask_rate: float = 0.15,
        n_tokens: int = 64,
        d_model: int = 64,
        n_heads: int = 4,
        n_transformer_layers: int = 2,
        n_classes: int = 0,
    ) -> None:
        super().__init__()
        if encoder not in MASKED_ENCODERS:
            raise ValueError(f"encoder must be one of {MASKED_ENCODERS}, got {encoder!r}.")
        if gene_likelihood not in GENE_LIKELIHOODS:
            raise ValueError(f"gene_likelihood must be one of {GENE_LIKELIHOODS}, got {gene_likelihood!r}.")
        if not 0.0 < mask_rate < 1.0:
            raise ValueError(f"mask_rate must be in (0, 1), got {mask_rate}.")
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
        """Pretraining: per-cell NLL of the hidden counts (``reconstruction``). Fine-tuning
        (``objective == "classify"``): per-cell cross-entropy (``reconstruction``) and, in ``extra``,
        ``accuracy`` (0/1 per cell). ``kl_weight`` is unused (no KL term)."""
        if self.objective == "classify":
            hidden = self.draw_mask(batch) if self.training and self.mask_when_classifying else None
            logits = self.class_logits(batch.counts, hidden)
            labels = batch.label_index
            ce = nn.functional.cross_entropy(logits, labels, reduction="none")
            accuracy = (logits.argmax(-1) == labels).to(ce.dtype)
            return LossOutput(loss=ce.mean(), reconstruction=ce, kl=torch.zeros_like(ce), extra={"accuracy": accuracy})
        nll, _ = self.masked_nll(batch, self.draw_mask(batch))
        return LossOutput(loss=nll.mean(), reconstruction=nll, kl=torch.zeros_like(nll))
