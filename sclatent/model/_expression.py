"""Expression outputs of the count VAEs (``VAE`` and ``SemiSupervisedVAE``): denoised and
counterfactual (batch-transformed) expression, posterior predictive counts, the latent library size.

Both models decode counts with a :class:`~sclatent.modules.vae.VAEModule` (the semi-supervised
model's M1); :class:`CountExpressionOutputs` reads it through the one hook ``_count_module()``.
"Counterfactual" expression decodes each cell's latent as if the cell had been measured in another
batch: the encoder still reads the cell's own batch (that is what it was observed in); only the
decoder's batch input changes, as in scvi-tools' ``transform_batch``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch

from ..base import seeded
from ..data import Registry
from ..data.ondisk import MatrixWriter
from ..modules.vae import VAEModule

#: What ``transform_batch`` accepts: None (each cell's own batch), one category, or several
#: (averaged over).
TransformBatch = str | int | Sequence[str | int] | None


def batch_codes(registry: Registry, transform_batch: TransformBatch) -> list[int] | None:
    """The registry codes of ``transform_batch``'s categories (None: each cell's own batch).

    Raises
    ------
    ValueError
        The model has no batches, the list is empty, or a category is not one of the model's.
    """
    if transform_batch is None:
        return None
    names = [transform_batch] if isinstance(transform_batch, str | int | np.integer) else list(transform_batch)
    known = [str(c) for c in registry.batch_categories]
    if not known:
        raise ValueError(
            "transform_batch needs a model set up with a batch_key; this one has a single batch. "
            "Leave transform_batch=None."
        )
    if not names:
        raise ValueError("transform_batch is an empty list: pass one or more of the model's batches, or None.")
    unknown = [name for name in names if str(name) not in known]
    if unknown:
        raise ValueError(
            f"transform_batch {unknown} not among this model's batches {known}. Pass one of them, a list of "
            "them (the expression is averaged over the list), or None for each cell's own batch."
        )
    return [known.index(str(name)) for name in names]


def gene_positions(var_names: list[str], gene_list: Sequence[str] | None) -> np.ndarray | None:
    """Positions of ``gene_list`` among the model's genes, in the list's order (None: all genes)."""
    if gene_list is None:
        return None
    if isinstance(gene_list, str):
        gene_list = [gene_list]
    position = {name: i for i, name in enumerate(var_names)}
    missing = [g for g in gene_list if g not in position]
    if missing:
        raise ValueError(
            f"gene_list holds {len(missing)} gene(s) the model was not trained on (e.g. {missing[:5]}); pass "
            "names from model.var_names."
        )
    return np.asarray([position[g] for g in gene_list], dtype=np.int64)


class CountExpressionOutputs:
    """Expression outputs shared by the count VAEs; the model class supplies ``_count_module()``."""

    def _count_module(self) -> VAEModule:
        raise NotImplementedError  # pragma: no cover - every user of the class defines it

    def _rows(self, adata: ad.AnnData | None, indices) -> pd.Index:
        names = (self.adata if adata is None else adata).obs_names
        return names if indices is None else names[self._indices(self._data(adata), indices)]

    @torch.no_grad()
    def get_normalized_expression(
        self,
        adata: ad.AnnData | None = None,
        indices=None,
        library_size: float | Literal["latent"] = 1.0,
        n_samples: int = 1,
        batch_size: int = 256,
        return_numpy: bool = False,
        seed: int | None = None,
        out: str | os.PathLike | None = None,
        transform_batch: TransformBatch = None,
        gene_list: Sequence[str] | None = None,
    ) -> pd.DataFrame | np.ndarray | Path:
        """Denoised expression: the decoder's mean, averaged over ``n_samples`` posterior draws.

        Parameters
        ----------
        adata, indices
            Cells to decode (default: the model's AnnData, all cells).
        library_size
            A number scales the normalised expression (rows sum to ``library_size``; 1e4 gives
            counts per 10k); ``"latent"`` returns expected counts at each cell's own library size.
        n_samples
            Posterior samples of z to average (1 uses the posterior mean).
        batch_size
            Cells per forward pass.
        return_numpy
            Return an array instead of a DataFrame.
        seed
            Seed of the posterior draws (``n_samples > 1``).
        out
            Write the result to this new ``.h5ad`` file or ``.zarr`` store minibatch by minibatch
            instead of returning it (the dense ``(n_cells, n_genes)`` result of a large dataset does
            not fit in memory): an AnnData whose dense ``X`` holds the values, with the cells' and
            genes' names; open it with ``anndata.read_h5ad(out, backed="r")`` or
            :func:`sclatent.data.read_backed`. Memory stays at one minibatch.
        transform_batch
            Decode every cell as if it had been measured in this batch (a category of the
            registry's ``batch_key``), or in each of a list of batches, averaged: the batch-corrected
            (counterfactual) expression. None: each cell's own batch.
        gene_list
            Genes to return (names from ``model.var_names``, in the order given); default all. The
            normalisation is over all genes either way.

        Returns
        -------
        pandas.DataFrame, numpy.ndarray or pathlib.Path
            ``(n_cells, n_genes)`` DataFrame (cells x genes) or array with ``return_numpy``; the path
            written with ``out``.

        Raises
        ------
        ValueError
            A ``transform_batch`` category the model does not know, or genes it was not trained on.
        """
        module = self._count_module()
        codes = batch_codes(self.registry, transform_batch)
        genes = gene_positions(self.var_names, gene_list)
        names = self.var_names if genes is None else [self.var_names[i] for i in genes]
        writer = MatrixWriter(out, self._rows(adata, indices), names) if out is not None else None
        columns = None if genes is None else torch.as_tensor(genes)
        chunks = []
        with seeded(seed), writer or contextlib.nullcontext():
            for batch in self._batches(adata, indices, batch_size):
                inf = module.inference(batch, n_samples=n_samples)
                z = module.latent_mean(inf) if n_samples == 1 else inf["z"]
                log_library = inf["ql_mean"] if "ql_mean" in inf and n_samples == 1 else inf["log_library"]
                values = module.expression(z, log_library, batch, codes, expected_counts=library_size == "latent")
                if n_samples > 1:
                    values = values.mean(0)
                if library_size != "latent":
                    values = values * float(library_size)
                if columns is not None:
                    values = values[:, columns.to(values.device)]
                if writer is not None:
                    writer.write(values.cpu().numpy())
                else:
                    chunks.append(values.cpu())
        if writer is not None:
            return writer.path
        values = torch.cat(chunks).numpy() if chunks else np.zeros((0, len(names)), np.float32)
        if return_numpy:
            return values
        return pd.DataFrame(values, index=self._rows(adata, indices), columns=names)

    @torch.no_grad()
    def posterior_predictive_sample(
        self,
        adata: ad.AnnData | None = None,
        indices=None,
        n_samples: int = 1,
        batch_size: int = 128,
        seed: int | None = None,
        transform_batch: str | int | None = None,
    ) -> np.ndarray:
        """Counts drawn from the posterior predictive: z, l ~ q, then x ~ p(x | z, l).

        Parameters
        ----------
        transform_batch
            Draw the counts as if every cell had been measured in this batch (one category of the
            registry's ``batch_key``); None: each cell's own batch.

        Returns
        -------
        numpy.ndarray
            ``(n_cells, n_genes)`` float32 integer counts, or ``(n_cells, n_genes, n_samples)``.
        """
        if transform_batch is not None and not isinstance(transform_batch, str | int | np.integer):
            raise ValueError(
                "posterior_predictive_sample takes one transform_batch category (counts drawn in several "
                "batches are not one sample); call it once per batch."
            )
        module = self._count_module()
        codes = batch_codes(self.registry, transform_batch)
        out = []
        with seeded(seed):
            for batch in self._batches(adata, indices, batch_size):
                decode = None if codes is None else batch.in_batch(codes[0])
                out.append(module.posterior_predictive(batch, n_samples, decode_batch=decode).permute(1, 2, 0).cpu())
        if not out:
            return np.zeros((0, self.registry.n_genes) + ((n_samples,) if n_samples > 1 else ()), np.float32)
        samples = torch.cat(out).numpy()
        return samples[..., 0] if n_samples == 1 else samples

    def differential_expression(
        self,
        adata: ad.AnnData | None = None,
        groupby: str | None = None,
        group1=None,
        group2=None,
        idx1=None,
        idx2=None,
        mode: Literal["change", "vanilla"] = "change",
        delta: float = 0.25,
        test_mode: Literal["three", "two"] = "three",
        batch_correction: bool = False,
        fdr_target: float = 0.05,
        n_samples: int = 5000,
        pseudocounts: float | None = None,
        batch_size: int = 256,
        seed: int | None = 0,
        key_added: str | None = None,
        progress_bar: bool = True,
    ) -> pd.DataFrame:
        """Bayesian differential expression between groups of cells (scVI's test; the maths is in
        the docstring of ``sclatent/model/_differential.py``).

        Parameters
        ----------
        adata
            Cells to compare (default: the model's AnnData).
        groupby
            obs column of the groups.
        group1, group2
            A group (or list of groups) of ``groupby`` and what it is compared with (default: every
            other cell). ``group1=None``: every group against the rest.
        idx1, idx2
            Cell positions or boolean masks instead of ``groupby`` groups (``idx2=None``: the rest).
        mode
            ``"change"``: the probability of a log2 fold change beyond ``delta``; ``"vanilla"``: the
            probability of the more likely direction.
        delta
            Smallest log2 fold change that counts as an effect (``mode="change"``).
        test_mode
            ``mode="change"`` only. ``"three"`` (scvi-tools' default): ``proba_de = max(P(log2 FC >=
            delta), P(log2 FC < -delta))``, up or down; ``"two"``: ``P(|log2 FC| > delta)``, which
            also counts the two tails of a wide posterior around no effect, and so ranks weak
            effects worse.
        batch_correction
            Decode both groups in every batch they hold and average (counterfactual expression), so
            a batch that differs between the groups does not pass for an effect.
        fdr_target
            Target of the posterior expected false discovery proportion (``is_de_fdr_<target>``).
        n_samples
            Posterior draws of the normalised expression per group (spread evenly over its cells).
        pseudocounts
            Added to the normalised expression before the log; None: estimated, per group, from the
            genes with a mean raw count below 0.01 there (the 90 % quantile of their normalised
            expression, the larger group's), as scvi-tools does.
        batch_size, seed, progress_bar
            Cells per forward pass; seed of the draws; a progress bar over the comparisons.
        key_added
            Also write scanpy's ``rank_genes_groups`` structure to ``adata.uns[key_added]`` (one
            entry per ``group1``; ``names`` in scanpy's order, up-regulated genes first by
            ``proba_de`` and the most certain down-regulations last, ties broken by the gap in mean
            expression; ``scores`` ``proba_de`` signed by the direction; ``logfoldchanges`` the mean
            log2 fold changes, ``pvals`` ``proba_not_de``, ``pvals_adj``
            the expected FDR of each top-k list), for ``sc.get.rank_genes_groups_df(adata, group,
            key=key_added)`` and ``sc.pl.rank_genes_groups_dotplot(adata, key=key_added)``.

        Returns
        -------
        pandas.DataFrame
            Genes x columns, one block per comparison sorted by ``proba_de``: ``lfc_mean``,
            ``lfc_median``, ``lfc_std`` (log2), ``proba_de``, ``proba_not_de``, ``bayes_factor``,
            ``is_de_fdr_<target>``, ``scale1``, ``scale2`` (mean normalised expression),
            ``raw_mean1``, ``raw_mean2``, ``non_zeros_proportion1``, ``non_zeros_proportion2``,
            ``group1``, ``group2``, ``comparison``.

        Raises
        ------
        ValueError
            A missing ``groupby`` column, an unknown group, a group with fewer than 2 cells, an
            unknown ``mode`` or ``test_mode``, or ``batch_correction`` on a model without batches.
        """
        from ._differential import differential_expression, rank_genes_groups_structure

        result, comparisons = differential_expression(
            self,
            self._count_module(),
            adata,
            groupby,
            group1,
            group2,
            idx1,
            idx2,
            mode,
            delta,
            test_mode,
            batch_correction,
            fdr_target,
            n_samples,
            pseudocounts,
            batch_size,
            seed,
            progress_bar,
        )
        if key_added is not None:
            target = self.adata if adata is None else adata
            target.uns[key_added] = rank_genes_groups_structure(result, comparisons, groupby, fdr_target, mode)
        return result

    @torch.no_grad()
    def get_latent_library_size(
        self, adata: ad.AnnData | None = None, indices=None, give_mean: bool = True, batch_size: int = 256
    ) -> np.ndarray:
        """The inferred library size of each cell (models with ``use_observed_library=False``).

        Parameters
        ----------
        give_mean
            The mean of the log-normal posterior ``q(l | x)``, ``exp(mu + sigma^2 / 2)``; False: one
            draw from it.

        Returns
        -------
        numpy.ndarray
            ``(n_cells, 1)`` float32, in counts.

        Raises
        ------
        ValueError
            The model uses the observed library size (there is no posterior to read).
        """
        module = self._count_module()
        if module.use_observed_library:
            raise ValueError(
                "This model uses each cell's observed library size (use_observed_library=True), so it infers none: "
                "read the observed totals (adata.X.sum(1)), or train with use_observed_library=False."
            )
        out = []
        for batch in self._batches(adata, indices, batch_size):
            inf = module.inference(batch)
            if give_mean:
                size = torch.exp(inf["ql_mean"] + inf["ql_var"] / 2)
            else:
                size = torch.exp(inf["log_library"])
            out.append(size.reshape(-1, 1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 1), np.float32)


__all__ = ["CountExpressionOutputs", "batch_codes", "gene_positions"]
