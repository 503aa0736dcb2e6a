"""Penalties shared by the cell and image models.

* :func:`contractive_penalty`: the squared Frobenius norm of the encoder's Jacobian
  ``||d code / d input||_F^2`` (Rifai et al. 2011), estimated per item with Hutchinson probes so
  that it costs one extra backward pass instead of one per code unit (the autoencoders, count and image).
* :func:`gradient_penalty`: WGAN-GP's penalty on a critic's input-gradient norm (Gulrajani et al.
  2017; the count GAN and the image GAN).
"""

from __future__ import annotations

import torch
from torch import nn


def contractive_penalty(code: torch.Tensor, inputs: torch.Tensor, probe: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` unbiased estimate of ``||J_b||_F^2``, ``J_b = d code_b / d inputs_b``, for each item ``b``.

    Hutchinson's identity ``E_v ||v^T J||^2 = tr(J J^T) = ||J||_F^2`` for a probe ``v ~ N(0, I)``:
    one vector-Jacobian product (a backward pass with ``create_graph=True``, so the penalty is
    itself differentiable) gives a one-probe estimate per item.

    Parameters
    ----------
    code
        ``(B, K)`` encoder outputs, computed from ``inputs`` (which must require gradients).
    inputs
        ``(B, *D)`` encoder inputs; item ``b`` of ``code`` must depend only on item ``b`` of
        ``inputs`` for the estimate to be per item (no BatchNorm in training mode across items).
    probe
        ``(B, K)`` probe vectors; default a fresh standard normal draw (``torch.randn_like(code)``).
        Passing the basis vectors ``e_k`` one at a time and summing gives the exact norm.

    Returns
    -------
    torch.Tensor
        ``(B,)`` squared norms, in (code units / input units)^2.
    """
    if not inputs.requires_grad:
        raise ValueError("the contractive penalty needs inputs that require gradients: call requires_grad_() first.")
    if probe is None:
        probe = torch.randn_like(code)
    (vjp,) = torch.autograd.grad((code * probe).sum(), inputs, create_graph=True)
    return (vjp**2).flatten(1).sum(-1)


def gradient_penalty(
    critic: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(B,)`` WGAN-GP penalty ``(||grad_u D(u^, y)||_2 - 1)^2`` at ``u^ = a real + (1 - a) fake``.

    ``a ~ U(0, 1)`` per item. The graph is kept (``create_graph``) so the penalty trains the critic.
    The critic treats items independently, so the gradient of the summed scores gives every
    item's own input gradient in one backward pass. Items may be vectors ``(B, G)`` or images
    ``(B, *shape)``: the norm is over all of an item's entries. ``critic(u, labels)`` returns ``(B,)``.
    """
    alpha = torch.rand(real.shape[0], 1, generator=generator, device=real.device, dtype=real.dtype)
    alpha = alpha.view(real.shape[0], *([1] * (real.dim() - 1)))
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    scores = critic(mixed, labels)
    (grad,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(dim=-1) - 1.0) ** 2
