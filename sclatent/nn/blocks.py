"""MLP with categorical/continuous covariate injection, Gaussian encoder, count decoder and a tied linear layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import _native
from .sparse import SparseLinear, SparseRows


def native_dropout_mask(kernel, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """A float32 inverted-dropout mask of ``shape`` (0, or ``1 / (1 - p)`` with probability ``1 - p``)
    from the native generator, its seed drawn from torch's generator: the one draw :class:`Dropout`
    and the fused training passes share, so the passes see the masks autograd would."""
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    mask = torch.empty(shape, dtype=torch.float32)
    kernel.dropout_mask(mask.numel(), seed, min(2**32 - 1, round(p * 2**32)), 1.0 / (1.0 - p), mask.data_ptr(), 1)
    return mask


class Dropout(nn.Module):
    """Inverted dropout, as ``torch.nn.Dropout``, with a faster mask on CPU.

    On CPU in float32 the mask comes from the native hash-based generator of
    :mod:`sclatent._native` (~20x faster than torch's ``bernoulli_`` at a 128 x 128 activation), its
    seed drawn from torch's generator so seeded training stays reproducible; elsewhere
    ``torch.nn.functional.dropout``.
    """

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}.")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        kernel = _native.kernels(x.device, x.dtype)
        if kernel is None:
            return nn.functional.dropout(x, self.p, training=True)
        return x * native_dropout_mask(kernel, tuple(x.shape), self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class InjectedLinear(nn.Module):
    """``Linear(x) + sum_k E_k[c_k] + W_c @ cont``: a linear layer fed with covariates.

    Adding an embedding row per category equals concatenating a one-hot code to ``x`` (as scVI
    does) but costs a lookup instead of a wider matmul. With ``sparse_input`` the layer takes a
    :class:`SparseRows` minibatch (or a dense one) through :class:`SparseLinear`.
    """

    def __init__(
        self, n_in: int, n_out: int, n_cats_per_cov: list[int], n_continuous: int, sparse_input: bool = False
    ) -> None:
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.linear = SparseLinear(n_in, n_out) if sparse_input else nn.Linear(n_in, n_out)
        self.embeddings = nn.ModuleList(nn.Embedding(n, n_out) for n in n_cats_per_cov if n > 1)
        self._use_cat = [n > 1 for n in n_cats_per_cov]
        for embedding in self.embeddings:
            nn.init.normal_(embedding.weight, std=n_in**-0.5)
        self.continuous = nn.Linear(n_continuous, n_out, bias=False) if n_continuous else None

    def add_categories(self, covariate: int, n_new: int) -> dict[str, torch.Tensor]:
        """Grow categorical covariate ``covariate`` by ``n_new`` categories, appended after the old ones.

        The old categories' rows are kept; the new rows are drawn as at construction
        (``N(0, 1 / n_in)``, torch's global generator). A covariate that had one category has no
        embedding (its row would be a constant absorbed by the bias): it gets one, whose row for
        the old category is zeros, so the layer's output for old cells does not change. The
        layer then has the embeddings a layer built with the grown category counts has, under
        the same state-dict names.

        Parameters
        ----------
        covariate
            Index of the covariate in ``n_cats_per_cov`` (0: the batch, by convention).
        n_new
            Categories to add (>= 1).

        Returns
        -------
        dict[str, torch.Tensor]
            ``{"embeddings.<i>.weight": mask}``: the grown weight's name in this layer and a
            ``(n_categories, n_out)`` bool mask, True on the new rows (empty when the layer reads
            no covariates).
        """
        if n_new < 1:
            raise ValueError(f"n_new must be >= 1, got {n_new}.")
        if covariate >= len(self._use_cat):
            return {}
        position = sum(self._use_cat[:covariate])
        device, dtype = self.linear.weight.device, self.linear.weight.dtype
        if self._use_cat[covariate]:
            old = self.embeddings[position].weight.detach()
        else:
            old = torch.zeros(1, self.n_out, device=device, dtype=dtype)
        n_old, n_out = old.shape
        grown = nn.Embedding(n_old + n_new, n_out, device=device, dtype=dtype)
        with torch.no_grad():
            grown.weight[:n_old] = old
            nn.init.normal_(grown.weight[n_old:], std=self.n_in**-0.5)
        if self._use_cat[covariate]:
            self.embeddings[position] = grown
        else:
            self.embeddings.insert(position, grown)
            self._use_cat[covariate] = True
        mask = torch.zeros(n_old + n_new, n_out, dtype=torch.bool, device=device)
        mask[n_old:] = True
        return {f"embeddings.{position}.weight": mask}

    def forward(
        self, x: torch.Tensor | SparseRows, cats: list[torch.Tensor], cont: torch.Tensor | None
    ) -> torch.Tensor:
        out = self.linear(x)
        used = (c for c, use in zip(cats, self._use_cat, strict=False) if use)
        for embedding, codes in zip(self.embeddings, used, strict=True):
            out = out + embedding(codes)
        if self.continuous is not None and cont is not None:
            out = out + self.continuous(cont)
        return out


class TiedLinear(nn.Module):
    """``x @ source.weight[:, :n_out] + bias``: the transpose of another layer's weight, own bias.

    The source is referenced, not registered, so its weight is stored (and optimised) once.
    """

    def __init__(self, source: nn.Module, n_out: int) -> None:
        super().__init__()
        object.__setattr__(self, "_source", source)
        self.n_out = n_out
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._source.weight  # (n_source_out, n_source_in): its rows are our inputs
        return torch.addmm(self.bias, x, weight[:, : self.n_out])


class BatchNorm1d(nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` whose statistics can be held.

    A held layer normalises with its running statistics in training too (it stays in eval mode
    whatever ``train()`` says), so it acts as the fixed affine map it was: what a frozen layer of
    a query model mapped onto a reference must be (scArches). Held or not, the state dict is a
    plain ``BatchNorm1d``'s.
    """

    held: bool = False

    def hold(self, held: bool = True) -> None:
        """Hold (or release) the running statistics: normalise with them in training as in evaluation."""
        self.held = bool(held)
        if self.held:
            super().train(False)

    def train(self, mode: bool = True) -> BatchNorm1d:
        return super().train(mode and not self.held)


@dataclass(frozen=True)
class LayerDescription:
    """What one hidden layer of an :class:`MLP` computes, for code that evaluates it by other means
    (the count VAE's fused training pass, :mod:`sclatent.modules.fused_elbo`).

    The layer is ``dropout(activation(norm(x @ W.T + b + sum_k E_k[c_k] + cont @ C.T)))``.

    Attributes
    ----------
    weight, bias
        ``(n_in, n_out)`` and ``(n_out,)`` for a sparse-input layer (:class:`SparseLinear`),
        ``(n_out, n_in)`` and ``(n_out,)`` for ``nn.Linear``.
    sparse_input
        Whether the layer reads :class:`SparseRows`.
    embeddings
        ``(n_categories, n_out)`` weights of the categorical covariates the layer reads.
    covariate_indices
        For each embedding, which of the minibatch's categorical codes (``MiniBatch.covariates()``,
        batch first) it reads (covariates with one category have no embedding).
    continuous_weight
        ``(n_out, n_continuous)`` or None.
    norm
        The ``nn.BatchNorm1d`` (its affine parameters and running statistics), or None.
    activation
        ``"relu"``.
    dropout
        Dropout probability in training (0: none).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    sparse_input: bool
    embeddings: tuple[torch.Tensor, ...]
    covariate_indices: tuple[int, ...]
    continuous_weight: torch.Tensor | None
    norm: nn.BatchNorm1d | None
    activation: str
    dropout: float


class MLP(nn.Module):
    """Fully connected layers (Linear -> BatchNorm -> ReLU -> Dropout) with covariates injected.

    Parameters
    ----------
    n_in, n_out
        Input and output widths.
    n_cats_per_cov
        Number of categories of each categorical covariate (batch first, by convention).
    n_continuous
        Number of continuous covariates.
    n_layers, dropout_rate, use_batch_norm
        Depth (>= 1), dropout probability and whether to batch-normalise.
    inject_covariates
        Feed covariates into every layer (True) or only the first.
    sparse_input
        The first layer takes a :class:`SparseRows` input (count encoders).
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_cats_per_cov: list[int] = (),
        n_continuous: int = 0,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        inject_covariates: bool = True,
        sparse_input: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        self.post = nn.ModuleList()
        for i in range(n_layers):
            with_covariates = inject_covariates or i == 0
            self.layers.append(
                InjectedLinear(
                    n_in if i == 0 else n_out,
                    n_out,
                    list(n_cats_per_cov) if with_covariates else [],
                    n_continuous if with_covariates else 0,
                    sparse_input=sparse_input and i == 0,
                )
            )
            post = [BatchNorm1d(n_out, momentum=0.01, eps=1e-3)] if use_batch_norm else []
            post.append(nn.ReLU())
            if dropout_rate > 0:
                post.append(Dropout(dropout_rate))
            self.post.append(nn.Sequential(*post))
        self.inject_covariates = inject_covariates

    def add_categories(self, covariate: int, n_new: int) -> dict[str, torch.Tensor]:
        """Grow categorical covariate ``covariate`` by ``n_new`` categories in every layer that reads
        it (``InjectedLinear.add_categories``: the old rows kept, new rows drawn as at construction,
        an embedding created with a zero old row for a covariate that had one category).

        Returns
        -------
        dict[str, torch.Tensor]
            Each grown weight's name in this MLP (``"layers.<k>.embeddings.<i>.weight"``) and its
            ``(n_categories, n_out)`` bool mask, True on the new rows.
        """
        masks = {}
        for k, layer in enumerate(self.layers):
            masks.update({f"layers.{k}.{name}": mask for name, mask in layer.add_categories(covariate, n_new).items()})
        return masks

    def describe(self) -> list[LayerDescription]:
        """Each hidden layer's parameters and operations, in order (see :class:`LayerDescription`)."""
        layers = []
        for layer, post in zip(self.layers, self.post, strict=True):
            parts = list(post)
            norm = next((p for p in parts if isinstance(p, nn.BatchNorm1d)), None)
            dropout = next((p.p for p in parts if isinstance(p, Dropout)), 0.0)
            layers.append(
                LayerDescription(
                    weight=layer.linear.weight,
                    bias=layer.linear.bias,
                    sparse_input=isinstance(layer.linear, SparseLinear),
                    embeddings=tuple(embedding.weight for embedding in layer.embeddings),
                    covariate_indices=tuple(i for i, use in enumerate(layer._use_cat) if use),
                    continuous_weight=None if layer.continuous is None else layer.continuous.weight,
                    norm=norm,
                    activation="relu",
                    dropout=dropout,
                )
            )
        return layers

    def forward(
        self, x: torch.Tensor | SparseRows, cats: list[torch.Tensor] = (), cont: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, n_in)`` -> ``(B, n_out)``; ``cats`` are ``(B,)`` int64 codes."""
        for i, (layer, post) in enumerate(zip(self.layers, self.post, strict=True)):
            inject = self.inject_covariates or i == 0
            x = post(layer(x, cats if inject else (), cont if inject else None))
        return x


class GaussianEncoder(nn.Module):
    """q(z | x) = N(mean(x), var(x)) with ``var = exp(.) + var_eps``.

    Returns ``(mean, var, z)``, each ``(B, n_out)``, ``z`` a reparameterised sample.
    """

    def __init__(self, n_in: int, n_out: int, n_hidden: int = 128, var_eps: float = 1e-4, **mlp_kwargs) -> None:
        super().__init__()
        self.body = MLP(n_in, n_hidden, **mlp_kwargs)
        # mean and log-variance heads as one matmul
        self.heads = nn.Linear(n_hidden, 2 * n_out)
        self.n_out = n_out
        self.var_eps = var_eps

    def forward(
        self, x: torch.Tensor | SparseRows, cats: list[torch.Tensor] = (), cont: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.body(x, cats, cont)
        mean, log_var = self.heads(h).split(self.n_out, dim=-1)
        var = torch.exp(log_var) + self.var_eps
        z = mean + var.sqrt() * torch.randn_like(mean)
        return mean, var, z


class CountDecoder(nn.Module):
    """p(x | z): an MLP and a single fused linear layer for every per-gene head.

    ``heads`` names the outputs, e.g. ``("scale", "zi_logits")``; each is ``(B, n_genes)``.
    Fusing the heads into one matmul is measurably faster than separate Linear layers.
    """

    def __init__(self, n_in: int, n_genes: int, heads: tuple[str, ...], n_hidden: int = 128, **mlp_kwargs) -> None:
        super().__init__()
        self.body = MLP(n_in, n_hidden, **mlp_kwargs)
        self.heads = heads
        self.n_genes = n_genes
        self.out = nn.Linear(n_hidden, n_genes * len(heads))

    def forward(
        self, z: torch.Tensor, cats: list[torch.Tensor] = (), cont: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        h = self.body(z, cats, cont)
        return dict(zip(self.heads, self.out(h).split(self.n_genes, dim=-1), strict=True))
