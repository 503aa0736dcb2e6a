"""``sclatent.model.CellGAN``: a cell-type-conditioned Wasserstein GAN that generates count cells."""

from __future__ import annotations

import math
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..data import SetupError
from ..modules.gan import CellGANHyperparameters, GANModule
from ..train import split_cells
from ._base import BaseModel

SYNTHETIC_KEY = "synthetic"
# Default length of training, in generator updates, with the default lr 1e-3. Measured on half of
# pbmc3k (1,319 cells x 2,000 genes): 600 updates at lr 1e-3 gave a held-out classifier AUROC of 0.79,
# 600 at 3e-4 (nearer the WGAN-GP paper's 1e-4) gave 0.88, still converging; the critic's
# Wasserstein estimate bottoms out near 250 updates at lr 1e-3 and creeps up after (the critic
# starts to memorise a small training set), so longer is not clearly better on CPU.
_DEFAULT_GENERATOR_STEPS = 600


class CellGAN(BaseModel):
    """Conditional WGAN-GP generating synthetic cells as integer counts (scGAN / cscGAN style).

    The generator maps Gaussian noise, a one-hot cell type and the cell's (standardised) log library
    size to an expression profile ``rho`` (softmax over genes); a synthetic cell is
    ``Poisson(l * rho)`` with ``l`` drawn from the empirical library sizes of training cells of
    the same type. The critic reads log-normalised counts (``log1p(x / total * 1e4)``) of real and
    synthetic cells alike and is conditioned by projection; the objective is WGAN-GP
    (gradient penalty weight 10, ``n_critic`` critic updates per generator update, Adam with betas
    ``(0.5, 0.9)``). See :mod:`sclatent.modules.gan` for why the critic sees sampled counts.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`CellGAN.setup_anndata` (raw counts). With ``labels_key``
        the GAN is conditioned on it; without, it is unconditional.
    {hyperparameters}
    seed
        Seed of the initialisation and default seed of ``train``.

    Notes
    -----
    ``batch_key`` and covariates are not modelled (the GAN conditions on the cell type only); they
    are refused rather than silently ignored.

    Examples
    --------
    >>> adata = sclatent.datasets.pbmc68k_counts()
    >>> sclatent.model.CellGAN.setup_anndata(adata, labels_key="bulk_labels")
    >>> gan = sclatent.model.CellGAN(adata)
    >>> gan.train()
    >>> fake = gan.sample(500, cell_type="Dendritic")   # AnnData of counts, obs["synthetic"] True
    """

    module_class = GANModule
    hyperparameters_class = CellGANHyperparameters
    name = "gan"

    def _check_hyperparameters(self) -> None:
        reg = self.registry
        if reg.batch_key or reg.categorical_covariate_keys or reg.continuous_covariate_keys:
            raise SetupError(
                "CellGAN conditions on the cell type (labels_key) only; batch_key and covariates are not "
                "modelled. Register the AnnData without them."
            )

    def _module_kwargs(self) -> dict[str, Any]:
        reg = self.registry
        return dict(n_genes=reg.n_genes, n_labels=reg.n_labels, **self._module_hyperparameters())

    @property
    def cell_types(self) -> list[str]:
        """The cell types the GAN is conditioned on (empty when unconditional)."""
        return list(self.registry.label_categories)

    # ----------------------------------------------------------------- training

    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 128,
        lr: float = 1e-3,
        train_size: float = 1.0,
        seed: int | None = None,
        **kwargs: Any,
    ) -> CellGAN:
        """Fit generator and critic adversarially; other arguments as :meth:`sclatent.model.VAE.train`.

        Parameters
        ----------
        max_epochs
            Default: enough epochs for about 600 generator updates (``n_critic`` minibatches each),
            at least 20.
        batch_size
            Real cells per critic update (and synthetic cells per update).
        lr
            Adam learning rate of both players (the WGAN-GP paper's 1e-4 converges more slowly than
            1e-3 within a CPU budget; see ``_DEFAULT_GENERATOR_STEPS``).
        train_size
            Fraction of cells trained on (default all: a GAN has no likelihood to hold out; held-out
            cells get ``validation_wasserstein``, the critic's estimate of the distance between them
            and synthetic cells).

        Unlike the likelihood models it does not stop early by default (``early_stopping=False``):
        neither player's loss says how realistic the synthetic cells are.

        Notes
        -----
        History (per epoch, means per cell): ``train_critic_loss`` (``-W + lambda * GP``),
        ``train_generator_loss`` (``-E[D(fake)]``), ``train_wasserstein`` (the critic's
        Wasserstein-1 estimate; it falls as the generator improves), ``train_gradient_penalty``,
        ``seconds``.
        """
        seed = self.seed if seed is None else seed
        data = self._data()
        cells = data.nonempty_cells
        # the split BaseModel.train will make (same function, same seed): the library bank holds
        # only training cells, so synthetic libraries never come from held-out cells
        train_cells, _ = split_cells(cells, train_size, seed)
        index = torch.as_tensor(train_cells)
        self.module.set_library_bank(data.library[index].cpu(), data.label_index[index].cpu())
        if max_epochs is None:
            steps_per_epoch = max(1, len(train_cells) // batch_size)
            max_epochs = max(20, math.ceil(_DEFAULT_GENERATOR_STEPS * self.module.n_critic / steps_per_epoch))
        kwargs.setdefault("kl_warmup_epochs", 0)
        # a fixed budget of generator updates: the players' losses do not measure sample quality
        kwargs.setdefault("early_stopping", False)
        kwargs["weight_decay"] = kwargs.get("weight_decay", 0.0)
        super().train(max_epochs=max_epochs, batch_size=batch_size, lr=lr, train_size=train_size, seed=seed, **kwargs)
        return self

    # ----------------------------------------------------------------- outputs

    def _check_trained(self) -> None:
        if not self.is_trained:
            raise RuntimeError("The GAN has not been trained yet; call train() first.")

    @torch.no_grad()
    def sample(
        self, n: int, cell_type: str | None = None, seed: int | None = None, batch_size: int = 4096
    ) -> ad.AnnData:
        """Synthetic cells as an AnnData of integer counts.

        Parameters
        ----------
        n
            Number of cells.
        cell_type
            A registered cell type: all ``n`` cells are of it. ``None``: types are drawn at their
            frequencies among the training cells (multinomially).
        seed
            Seed of the draw (types, library sizes, noise, Poisson counts); default the model's.
        batch_size
            Cells generated at once.

        Returns
        -------
        anndata.AnnData
            AnnData ``(n, G)``: ``X`` CSR float32 non-negative integer counts, ``var_names`` the model's
            genes; ``obs[labels_key]`` (categorical over all registered types) when the GAN is
            conditional, ``obs["synthetic"]`` True, ``obs["library_size"]`` the sampled library
            (the cell's total is ``Poisson``-close to it: the counts are ``Poisson(l * rho)``).
        """
        self._check_trained()
        n = int(n)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}.")
        types = self.cell_types
        if cell_type is not None:
            if not types:
                raise ValueError("This GAN is unconditional (no labels_key was registered); pass cell_type=None.")
            if cell_type not in types:
                raise ValueError(f"Unknown cell_type {cell_type!r}; the GAN knows {types}.")
        generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        module = self.module
        module.eval()
        if cell_type is not None:
            labels = torch.full((n,), types.index(cell_type), dtype=torch.int64)
        else:
            frequencies = module.label_counts().double().cpu()
            labels = (
                torch.multinomial(frequencies, n, replacement=True, generator=generator)
                if n
                else torch.zeros(0, dtype=torch.int64)
            )
        chunks, libraries = [], []
        for begin in range(0, n, batch_size):
            chunk_labels = labels[begin : begin + batch_size]
            library = module.sample_library(chunk_labels, generator)
            mean = library[:, None] * module.profiles(chunk_labels.to(self.device), library, generator)
            # the Poisson draw on the CPU generator keeps samples identical across devices and reloads
            counts = torch.poisson(mean.cpu().double(), generator=generator).float()
            chunks.append(sp.csr_matrix(counts.numpy()))
            libraries.append(library.cpu().numpy())
        x = sp.vstack(chunks, format="csr") if chunks else sp.csr_matrix((0, self.registry.n_genes), dtype=np.float32)
        obs = pd.DataFrame(index=pd.Index([f"synthetic_{i}" for i in range(n)]))
        if types:
            obs[self.registry.labels_key] = pd.Categorical.from_codes(labels.numpy(), categories=types)
        obs[SYNTHETIC_KEY] = True
        obs["library_size"] = np.concatenate(libraries) if libraries else np.zeros(0, np.float32)
        return ad.AnnData(X=x.astype(np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(self.var_names)))

    @torch.no_grad()
    def get_latent_representation(
        self, adata: ad.AnnData | None = None, indices=None, batch_size: int = 1024
    ) -> np.ndarray:
        """The critic's last hidden layer (features before its real/fake score) for each cell.

        A GAN has no encoder: nothing here is an inferred latent variable. These features are what
        the critic learned to tell real from synthetic cells with; they do not depend on the label
        (the label enters the score only by projection), and how well they separate cell types is
        measured, not promised (``tests/model/test_gan.py``, ``tutorials/05_gan_augmentation.md``).

        Returns
        -------
        numpy.ndarray
            ``(n_cells, critic_hidden[-1])`` float32.
        """
        self._check_trained()
        out = [self.module.critic_features(batch.counts).cpu() for batch in self._batches(adata, indices, batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.hyperparameters["critic_hidden"][-1]), np.float32)

    def __repr__(self) -> str:
        text = super().__repr__()
        if self.history.get("train_wasserstein"):
            text += f"\n  last epoch: critic's Wasserstein estimate {self.history['train_wasserstein'][-1]:.3f}"
        return text


__all__ = ["SYNTHETIC_KEY", "CellGAN"]
