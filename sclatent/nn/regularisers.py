"""Penalties on an encoder shared by the autoencoders (count and image).

* :func:`contractive_penalty`: the squared Frobenius norm of the encoder's Jacobian
  ``||d code / d input||_F^2`` (Rifai et al. 2011), estimated per item with Hutchinson probes so
  that it costs one extra backward pass instead of one per code unit.
"""

from __future__ import annotations

import torch


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
    ``(B,)`` squared norms, in (code units / input units)^2.
    """
    if not inputs.requires_grad:
        raise ValueError("the contractive penalty needs inputs that require gradients: call requires_grad_() first.")
    if probe is None:
        probe = torch.randn_like(code)
    (vjp,) = torch.autograd.grad((code * probe).sum(), inputs, create_graph=True)
    return (vjp**2).flatten(1).sum(-1)
