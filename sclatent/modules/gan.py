"""A cell-type-conditioned Wasserstein GAN of count profiles (scGAN / cscGAN style), pure torch.

Data flow for a minibatch of real cells with counts ``x``, labels ``y`` and libraries ``l``::

    z ~ N(0, I)                                     noise                         (n_noise)
    rho    = softmax(G(z, onehot(y), std log l))    generator: expression profile (G), sums to 1
    x~     = Poisson(l * rho)                       synthetic counts; straight-through gradient
    u      = log1p(x / sum(x) * 1e4)                what the critic reads, real and synthetic alike
    D(u, y) = w . h(u) + e_y . h(u) + b             critic with projection conditioning (h: 128 features)

Objective (WGAN-GP, Gulrajani et al. 2017)::

    critic:     E[D(u~, y)] - E[D(u, y)] + lambda * E[(||grad_u^ D(u^, y)|| - 1)^2],  u^ on real-fake segments
    generator:  -E[D(u~, y)]

Why the critic reads *sampled* counts, not the generator's mean ``l * rho``: real profiles carry
Poisson-like sampling noise and many exact zeros, a mean profile has neither, so a critic shown means
separates them trivially and drives the generator to imitate sampling noise inside ``rho`` (which
sampling would then add a second time). Here the generator models only the biology (``rho``), the
counts are drawn exactly as :meth:`GANModule.sample_counts` draws them, and the gradient reaches ``rho`` through
the straight-through estimator ``x~ = mu + (Poisson(mu) - mu).detach()`` (exact in expectation:
``dE[Poisson(mu)]/dmu = 1``).

Library sizes are not generated: training pairs each synthetic cell with the library of the real
cell it stands beside (same label), and sampling draws them from the per-type empirical library
distribution stored in the module (its ``library_bank`` buffer, :meth:`GANModule.set_library_bank`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..contracts import AdversarialModule, LossOutput
from ..data.loader import MiniBatch
from ..hyperparameters import Hyperparameters, setting
from ..nn.regularisers import gradient_penalty

NORMALISED_TOTAL = 1e4


def log_normalise(counts: torch.Tensor) -> torch.Tensor:
    """``(B, G)`` ``log1p(x / sum_g x * 1e4)``; an all-zero row stays zero."""
    total = counts.sum(-1, keepdim=True).clamp_min(1.0)
    return torch.log1p(counts / total * NORMALISED_TOTAL)


def straight_through_poisson(mean: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Poisson counts of ``mean`` whose gradient w.r.t. ``mean`` is the identity (straight-through).

    The forward value is an exact Poisson draw (integers); backward treats the draw as ``mean``
    plus noise independent of it, the gradient of the expectation.
    """
    draw = torch.poisson(mean.detach(), generator=generator)
    return mean + (draw - mean).detach()


class Generator(nn.Module):
    """``(z, label, log-library) -> rho``: an MLP ending in a softmax over genes.

    Parameters
    ----------
    n_genes, n_labels, n_noise
        Output width ``G``, number of cell types, noise width.
    n_hidden
        Widths of the hidden layers (LeakyReLU 0.2; no normalisation, so a generated cell does not
        depend on the others in its minibatch).
    """

    def __init__(self, n_genes: int, n_labels: int, n_noise: int, n_hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.n_labels = n_labels
        layers: list[nn.Module] = []
        width = n_noise + n_labels + 1
        for h in n_hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU(0.2)]
            width = h
        layers.append(nn.Linear(width, n_genes))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor, log_library_std: torch.Tensor) -> torch.Tensor:
        """``(B, G)`` expression profiles (rows sum to 1) for noise ``(B, n_noise)``, labels ``(B,)``
        int64 and standardised log libraries ``(B,)``."""
        onehot = nn.functional.one_hot(labels, self.n_labels).to(z.dtype)
        return torch.softmax(self.net(torch.cat([z, onehot, log_library_std[:, None]], dim=-1)), dim=-1)


class Critic(nn.Module):
    """``(u, label) -> score``: an MLP on log-normalised counts with projection conditioning.

    ``score = w . h(u) + e_label . h(u) + b`` (Miyato & Koyama 2018), where ``h`` are the last hidden
    layer's features; no batch normalisation (the gradient penalty is per cell).
    """

    def __init__(self, n_genes: int, n_labels: int, n_hidden: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_genes
        for h in n_hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU(0.2)]
            width = h
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(width, 1)
        self.embedding = nn.Embedding(n_labels, width)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, u: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(B,)`` critic scores of log-normalised profiles ``(B, G)`` with labels ``(B,)``."""
        h = self.features(u)
        return self.out(h).squeeze(-1) + (self.embedding(labels) * h).sum(-1)


@dataclass(frozen=True)
class CellGANHyperparameters(Hyperparameters):
    """The cell GAN's hyperparameters, declared once: read by :class:`GANModule`,
    :class:`sclatent.model.CellGAN` and the ``fit-gan`` command."""

    family: ClassVar[str] = "CellGAN"

    n_noise: int = setting(64, "Width of the generator's Gaussian noise.")
    generator_hidden: tuple[int, ...] = setting((256, 512), "Hidden layer widths of the generator.")
    critic_hidden: tuple[int, ...] = setting((256, 128), "Hidden layer widths of the critic.")
    n_critic: int = setting(5, "Critic updates per generator update (each on its own minibatch).", minimum=1)
    gradient_penalty_weight: float = setting(10.0, "WGAN-GP's lambda (10 in the paper).", minimum=0)


class GANModule(AdversarialModule):
    """Conditional WGAN-GP on counts: generator and critic, trained by :func:`sclatent.train.fit`.

    Parameters
    ----------
    n_genes, n_labels
        Genes ``G`` and cell types (1: unconditional).
    betas
        Adam betas of both players (WGAN-GP: ``(0.5, 0.9)``; a module setting only, the model class
        always uses the default).
    **hyperparameters
        :class:`CellGANHyperparameters`: ``n_noise`` (width of the generator's Gaussian noise),
        ``generator_hidden`` and ``critic_hidden`` (hidden layer widths), ``n_critic`` (critic
        updates per generator update, each on its own minibatch), ``gradient_penalty_weight``
        (``lambda`` of WGAN-GP, 10 in the paper).
    """

    #: no likelihood and no player's loss is "the" objective: the sum of the players' mean losses
    default_monitor = "loss"

    def __init__(
        self,
        n_genes: int,
        n_labels: int = 1,
        betas: tuple[float, float] = (0.5, 0.9),
        **hyperparameters: Any,
    ) -> None:
        super().__init__()
        settings = CellGANHyperparameters.from_dict(hyperparameters)
        self.n_genes, self.n_labels, self.n_noise = n_genes, n_labels, settings.n_noise
        self.n_critic, self.gradient_penalty_weight = int(settings.n_critic), float(settings.gradient_penalty_weight)
        self.betas = tuple(betas)
        self.generator = Generator(n_genes, n_labels, settings.n_noise, tuple(settings.generator_hidden))
        self.critic = Critic(n_genes, n_labels, tuple(settings.critic_hidden))
        # the empirical library sizes of the training cells, sorted by label, and each label's slice
        # (filled by set_library_bank; buffers, so they are saved with the weights)
        self.register_buffer("library_bank", torch.zeros(0))
        self.register_buffer("bank_offsets", torch.zeros(n_labels + 1, dtype=torch.int64))
        # mean and sd of the log library, to standardise the generator's library input
        self.register_buffer("log_library_stats", torch.tensor([0.0, 1.0]))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # the library bank's length is the number of training cells: take the saved one's shape
        bank = state_dict.get(prefix + "library_bank")
        if bank is not None:
            self.library_bank = torch.zeros_like(bank, device=self.library_bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----------------------------------------------------------------- the trainer's protocol

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The two players, critic first (the order of their updates within a minibatch)."""
        return {"critic": list(self.critic.parameters()), "generator": list(self.generator.parameters())}

    def groups_to_step(self, step: int) -> list[str]:
        """The critic updates on every minibatch; the generator on every ``n_critic``-th."""
        return ["critic", "generator"] if (step + 1) % self.n_critic == 0 else ["critic"]

    def optimizer_settings(self) -> dict[str, dict]:
        # eps 1e-8 (not the trainer's scVI default 0.01, which would damp these small gradients)
        return {name: {"betas": self.betas, "eps": 1e-8} for name in ("critic", "generator")}

    # ----------------------------------------------------------------- library sizes

    def set_library_bank(self, library: torch.Tensor, labels: torch.Tensor) -> None:
        """Store the training cells' libraries ``(N,)`` by label ``(N,)`` for :meth:`sample_library`."""
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=self.n_labels)
        self.library_bank = library[order].float().to(self.library_bank.device)
        offsets = torch.zeros(self.n_labels + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(counts.cpu(), 0)
        self.bank_offsets = offsets.to(self.bank_offsets.device)
        log_lib = torch.log(self.library_bank.clamp_min(1.0))
        sd = log_lib.std() if log_lib.numel() > 1 else torch.tensor(1.0)
        self.log_library_stats = torch.stack([log_lib.mean(), sd.clamp_min(1e-3)]).to(self.log_library_stats.device)

    def label_counts(self) -> torch.Tensor:
        """``(n_labels,)`` training cells per label."""
        return self.bank_offsets[1:] - self.bank_offsets[:-1]

    def sample_library(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B,)`` library sizes drawn with replacement from the training cells of each label."""
        counts = self.label_counts()[labels.cpu()]
        if (counts == 0).any():
            raise ValueError("No training cells of a requested label: cannot sample its library sizes.")
        pick = (torch.rand(labels.shape[0], generator=generator) * counts).long().clamp_max(counts - 1)
        return self.library_bank[(self.bank_offsets[:-1][labels.cpu()] + pick).to(self.library_bank.device)]

    # ----------------------------------------------------------------- generation

    def profiles(
        self, labels: torch.Tensor, library: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``(B, G)`` generated expression profiles for labels ``(B,)`` and libraries ``(B,)``."""
        # with a (CPU) generator the noise is drawn on the CPU and moved: the same cells on any device
        z = torch.randn(labels.shape[0], self.n_noise, generator=generator, device=None if generator else labels.device)
        z = z.to(labels.device)
        mean, sd = self.log_library_stats
        return self.generator(z, labels, (torch.log(library.clamp_min(1.0)) - mean) / sd)

    def sample_counts(
        self, labels: torch.Tensor, library: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``(B, G)`` synthetic counts ``Poisson(l * rho)``; differentiable (straight-through) in ``rho``."""
        mean = library[:, None] * self.profiles(labels, library, generator)
        return straight_through_poisson(mean, generator)

    def critic_features(self, counts: torch.Tensor) -> torch.Tensor:
        """``(B, n_features)`` the critic's last hidden layer on counts ``(B, G)``."""
        return self.critic.features(log_normalise(counts))

    # ----------------------------------------------------------------- objectives

    def loss(self, batch: MiniBatch, kl_weight: float = 1.0, group: str = "critic") -> LossOutput:
        """The objective of ``group`` (``"critic"`` or ``"generator"``) on one minibatch of real cells.

        Synthetic cells are generated with the minibatch's labels and libraries. The critic's
        ``terms`` hold, per cell: ``wasserstein`` (``D(real) - D(fake)``; its mean estimates the
        Wasserstein-1 distance the critic sees) and, with gradients enabled, ``gradient_penalty``;
        the generator's none (its loss is all there is). A GAN has no likelihood and no ELBO.
        ``kl_weight`` is ignored.
        """
        if group not in ("critic", "generator"):
            raise ValueError(f"group must be 'critic' or 'generator', got {group!r}.")
        labels = batch.label_index
        if group == "critic":
            with torch.no_grad():
                fake = log_normalise(self.sample_counts(labels, batch.library))
            real = log_normalise(batch.counts)
            real_score, fake_score = self.critic(real, labels), self.critic(fake, labels)
            wasserstein = real_score - fake_score
            terms = {"wasserstein": wasserstein.detach()}
            loss = -wasserstein.mean()
            if torch.is_grad_enabled() and self.gradient_penalty_weight > 0:
                penalty = gradient_penalty(self.critic, real, fake, labels)
                terms["gradient_penalty"] = penalty.detach()
                loss = loss + self.gradient_penalty_weight * penalty.mean()
            return LossOutput(loss=loss, terms=terms)
        # the generator: make the critic score its cells as real
        fake_score = self.critic(log_normalise(self.sample_counts(labels, batch.library)), labels)
        return LossOutput(loss=-fake_score.mean())
