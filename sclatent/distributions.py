"""Count likelihoods: zero-inflated negative binomial, negative binomial and Poisson.

All log-probabilities are parameterised by the mean ``mu`` (>= 0), the inverse dispersion
``theta`` (> 0; NB variance is ``mu + mu**2 / theta``) and, for the ZINB, the zero-inflation
logits ``zi_logits`` (probability of an excess zero is ``sigmoid(zi_logits)``). Shapes broadcast
elementwise: ``theta`` may be per gene ``(G,)``, per gene and batch/label (gathered to ``(B, G)``)
or per gene and cell ``(B, G)``.

Why our own code rather than ``torch.distributions.NegativeBinomial`` or pyro's
``ZeroInflatedNegativeBinomial``: both take ``(total_count, logits)`` so a mean
parameterisation costs an extra ``log``/``logit`` round trip, both evaluate ``lgamma`` on every
entry, and neither is stable for very large ``theta`` (``theta * log(theta / (theta + mu))``
cancels catastrophically; we use ``-theta * log1p(mu / theta)``). Single-cell count matrices are
mostly zeros, and a zero's log-probability has a closed form without ``lgamma``. The fast path
:func:`count_log_likelihood` therefore evaluates the cheap zero term densely and corrects it only
at the nonzero entries of a sparse minibatch. The tests check every function against scipy and
pyro.

Also here, for every model with a Gaussian latent (cell and image VAEs, flows): the diagonal
Gaussian log-density :func:`gaussian_log_prob` and the closed-form KL :func:`gaussian_kl`.
"""

from __future__ import annotations

import math
import threading
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from . import _native

GeneLikelihood = Literal["zinb", "nb", "poisson"]
GENE_LIKELIHOODS: tuple[str, ...] = get_args(GeneLikelihood)


def _nb_log_zero(mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """log NB(0 | mu, theta) = theta * log(theta / (theta + mu)), stable for huge theta."""
    return -theta * torch.log1p(mu / theta)


def _zero_term(
    likelihood: str,
    mu: torch.Tensor,
    theta: torch.Tensor | None,
    zi_logits: torch.Tensor | None,
) -> torch.Tensor:
    """log p(x = 0) for every entry; closed form, no lgamma."""
    if likelihood == "poisson":
        return -mu
    nb0 = _nb_log_zero(mu, theta)
    if likelihood == "nb":
        return nb0
    # log(pi + (1 - pi) * NB(0)) with pi = sigmoid(zi_logits), in log space
    return F.softplus(nb0 - zi_logits) - F.softplus(-zi_logits)


def _nonzero_term(
    likelihood: str,
    x: torch.Tensor,
    mu: torch.Tensor,
    log_mu: torch.Tensor,
    theta: torch.Tensor | None,
    zi_logits: torch.Tensor | None,
    log_factorial: torch.Tensor | None = None,
    lgamma_theta: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p(x) for entries with x > 0 (1-D tensors of the gathered nonzeros).

    ``log_factorial`` (``lgamma(x + 1)``) and ``lgamma_theta`` (float64) may be passed in when
    they are known already: the first is a property of the data, the second is shared by every
    nonzero of a gene when the dispersion is per gene.
    """
    if log_factorial is None:
        log_factorial = torch.lgamma(x + 1.0)
    if likelihood == "poisson":
        return x * log_mu - mu - log_factorial
    # lgamma(x + theta) - lgamma(theta) cancels badly in float32 once theta is large; it is
    # evaluated only at nonzeros, so float64 here costs little.
    theta64 = theta.double()
    if lgamma_theta is None:
        lgamma_theta = torch.lgamma(theta64)
    log_binom = (torch.lgamma(x.double() + theta64) - lgamma_theta).to(x.dtype) - log_factorial
    # x * log(mu / (theta + mu)) written as log_mu - log(theta + mu) via logaddexp for mu ~ 0
    log_theta = torch.log(theta)
    log_p = log_binom + _nb_log_zero(mu, theta) + x * (log_mu - torch.logaddexp(log_theta, log_mu))
    if likelihood == "nb":
        return log_p
    return log_p - F.softplus(zi_logits)


def _check_likelihood(likelihood: str) -> None:
    if likelihood not in GENE_LIKELIHOODS:
        raise ValueError(f"gene_likelihood must be one of {GENE_LIKELIHOODS}, got {likelihood!r}.")


def count_log_likelihood(
    likelihood: str,
    log_mu: torch.Tensor,
    theta: torch.Tensor | None,
    zi_logits: torch.Tensor | None,
    nz_row: torch.Tensor,
    nz_col: torch.Tensor,
    nz_val: torch.Tensor,
) -> torch.Tensor:
    """Per-cell log-likelihood of a sparse count minibatch.

    Parameters
    ----------
    likelihood
        ``"zinb"``, ``"nb"`` or ``"poisson"``.
    log_mu
        ``(B, G)`` log of the mean counts.
    theta
        Inverse dispersion, broadcastable to ``(B, G)``; ignored for Poisson.
    zi_logits
        ``(B, G)`` zero-inflation logits; ZINB only.
    nz_row, nz_col, nz_val
        ``(nnz,)`` row, column and value of the minibatch's nonzero counts.

    Returns
    -------
    torch.Tensor
        ``(B,)`` log p(x_b) summed over genes, in nats.
    """
    _check_likelihood(likelihood)
    mu = torch.exp(log_mu)
    if theta is not None:
        theta = theta.expand_as(log_mu)
    dense = _zero_term(likelihood, mu, theta, zi_logits).sum(-1)
    if nz_val.numel() == 0:
        return dense

    def at_nonzeros(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[nz_row, nz_col]

    mu_nz, theta_nz, zi_nz = at_nonzeros(mu), at_nonzeros(theta), at_nonzeros(zi_logits)
    correction = _nonzero_term(likelihood, nz_val, mu_nz, log_mu[nz_row, nz_col], theta_nz, zi_nz)
    correction = correction - _zero_term(likelihood, mu_nz, theta_nz, zi_nz)
    return dense.index_add(0, nz_row, correction)


def log_prob(
    likelihood: str,
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor | None = None,
    zi_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Elementwise log-probability of dense counts ``x`` (any shape broadcast with ``mu``).

    The reference, dense path (``lgamma`` on every entry); training uses
    :func:`count_log_likelihood`.
    """
    _check_likelihood(likelihood)
    x, mu = torch.broadcast_tensors(x, mu)
    if theta is not None:
        theta = theta.expand_as(mu)
    if zi_logits is not None:
        zi_logits = zi_logits.expand_as(mu)
    zero = _zero_term(likelihood, mu, theta, zi_logits)
    # the unused branch must stay finite, or torch.where leaks 0 * inf = NaN into the gradient at mu = 0
    safe_mu = torch.where(x > 0, mu, torch.ones_like(mu))
    nonzero = _nonzero_term(likelihood, x, safe_mu, torch.log(safe_mu), theta, zi_logits)
    return torch.where(x > 0, nonzero, zero)


def log_nb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Elementwise log NB(x | mu, theta). See :func:`log_prob`."""
    return log_prob("nb", x, mu, theta)


def log_zinb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor) -> torch.Tensor:
    """Elementwise log ZINB(x | mu, theta, sigmoid(zi_logits)). See :func:`log_prob`."""
    return log_prob("zinb", x, mu, theta, zi_logits)


def log_poisson(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Elementwise log Poisson(x | mu). See :func:`log_prob`."""
    return log_prob("poisson", x, mu)


def gaussian_kl(mean: torch.Tensor, var: torch.Tensor, prior_mean=0.0, prior_var=1.0) -> torch.Tensor:
    """KL(N(mean, var) || N(prior_mean, prior_var)) summed over the last dimension, ``(B,)``."""
    prior_var = torch.as_tensor(prior_var, dtype=var.dtype, device=var.device)
    return 0.5 * (torch.log(prior_var / var) + (var + (mean - prior_mean) ** 2) / prior_var - 1.0).sum(-1)


def gaussian_log_prob(x: torch.Tensor, mean, var) -> torch.Tensor:
    """log N(x | mean, var) summed over the last dimension."""
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    return (-0.5 * (math.log(2 * math.pi) + torch.log(var) + (x - mean) ** 2 / var)).sum(-1)


def sample(
    likelihood: str,
    mu: torch.Tensor,
    theta: torch.Tensor | None = None,
    zi_logits: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw counts with mean ``mu`` (shape of ``mu``; float tensor of integers).

    NB is sampled as a Gamma-Poisson mixture: ``lambda ~ Gamma(theta, rate=theta / mu)``,
    ``x ~ Poisson(lambda)``, so ``E[x] = mu`` and ``Var[x] = mu + mu**2 / theta``.
    ZINB additionally zeroes each entry with probability ``sigmoid(zi_logits)``.
    """
    _check_likelihood(likelihood)
    rate = mu
    if likelihood != "poisson":
        theta = theta.expand_as(mu)
        # torch's gamma sampler takes no generator: the gamma draw follows the global RNG
        # (torch.manual_seed), the Poisson and zero-inflation draws follow ``generator``.
        rate = torch._standard_gamma(theta) * (mu / theta)
    counts = torch.poisson(rate, generator=generator)
    if likelihood == "zinb":
        pi = torch.sigmoid(zi_logits.expand_as(mu))
        keep = torch.rand(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype) >= pi
        counts = counts * keep
    return counts


class _SoftmaxCountLogLikelihood(torch.autograd.Function):
    """Fused decoder output + likelihood with hand-written gradients.

    Every entry takes the zero term's closed form; nonzero entries then swap it for the full
    term. Both gradients are written out (the nonzero one with digamma, on ``nnz`` entries only) and
    reuse the forward's intermediates, so backward costs a few elementwise passes instead of
    autograd's dozens of small kernels. Tested against autograd through
    :func:`count_log_likelihood`.
    """

    @staticmethod
    def forward(ctx, likelihood, logits, log_library, log_theta, zi_logits, nz_row, nz_col, nz_val, nz_log_factorial):
        # softmax by hand to keep the log-normaliser: log(rho) is then exact at the nonzeros
        row_max = logits.amax(-1, keepdim=True)
        rho = torch.exp(logits - row_max)
        normaliser = rho.sum(-1, keepdim=True)
        rho /= normaliser
        log_normaliser = row_max + torch.log(normaliser)
        mu = rho * torch.exp(log_library)
        theta = ratio = log1p_ratio = s = d_zi = None
        # evaluation passes (validation, get_elbo) need no gradient pieces: skip computing them
        needs_grad = any(ctx.needs_input_grad)
        if likelihood == "poisson":
            zero = -mu
        else:
            theta = torch.exp(log_theta).expand_as(mu)
            ratio = mu / theta
            log1p_ratio = torch.log1p(ratio)
            zero = -theta * log1p_ratio
            if likelihood == "zinb":
                # log(pi + (1 - pi) w) with w = NB(0): three transcendentals per entry instead of
                # the six of the softplus form; p0 is clamped at the smallest normal float, which
                # only binds when both pi and w underflow
                pi = torch.sigmoid(zi_logits)
                # floor at e^-80: below it w is negligible next to pi, and the denormal floats
                # that exp would return instead are ~100x slower to compute with on x86
                w = torch.exp(torch.clamp_min(zero, -80.0))
                p0 = torch.clamp_min(pi + (1.0 - pi) * w, torch.finfo(mu.dtype).tiny)
                if needs_grad:
                    s = (1.0 - pi) * w / p0  # d log p0 / d log NB(0)
                    d_zi = pi * (1.0 - pi) * (1.0 - w) / p0  # d log p0 / d zi_logits
                zero = torch.log(p0)
        out = zero.sum(-1)
        grads_nz = None
        if nz_val.numel():
            nz = (nz_row, nz_col)
            log_mu_nz = logits[nz] - log_normaliser[nz_row, 0] + log_library[nz_row, 0]
            mu_nz = mu[nz]
            theta_nz = None if theta is None else theta[nz]
            zi_nz = None if zi_logits is None else zi_logits[nz]
            lgamma_theta = digamma_theta = None
            if theta is not None and log_theta.shape[0] == 1:
                # one dispersion per gene: lgamma/digamma once per gene rather than per nonzero
                theta_row = torch.exp(log_theta[0].double())
                lgamma_theta = torch.lgamma(theta_row)[nz_col]
                digamma_theta = torch.digamma(theta_row)[nz_col] if needs_grad else None
            full = _nonzero_term(likelihood, nz_val, mu_nz, log_mu_nz, theta_nz, zi_nz, nz_log_factorial, lgamma_theta)
            out = out.index_add(0, nz_row, full - zero[nz])
            if needs_grad:
                grads_nz = _nonzero_grads(likelihood, nz_val, mu_nz, theta_nz, zi_nz, digamma_theta)
        ctx.likelihood = likelihood
        ctx.theta_rows = None if log_theta is None else log_theta.shape[0]
        ctx.save_for_backward(rho, mu, theta, ratio, log1p_ratio, s, d_zi, nz_row, nz_col)
        ctx.grads_nz = grads_nz
        return out

    @staticmethod
    def backward(ctx, grad_out):
        rho, mu, theta, ratio, log1p_ratio, s, d_zi, nz_row, nz_col = ctx.saved_tensors
        likelihood, grads_nz = ctx.likelihood, ctx.grads_nz
        g = grad_out.unsqueeze(-1)
        grad_zi = grad_log_theta = None
        if likelihood == "poisson":
            grad_log_mu = -mu
        else:
            inv = torch.reciprocal(1.0 + ratio)
            grad_log_theta = theta * (ratio * inv - log1p_ratio)  # d log NB(0) / d log(theta)
            grad_log_mu = -(mu * inv)  # d log NB(0) / d log(mu)
            if likelihood == "zinb":
                grad_log_mu *= s
                grad_log_theta *= s
                grad_zi = d_zi
        if grads_nz is not None:
            # at nonzero counts the full term replaces the zero term, and so does its gradient
            nz = (nz_row, nz_col)
            grad_log_mu = grad_log_mu.index_put(nz, grads_nz[0])
            if grad_log_theta is not None:
                grad_log_theta = grad_log_theta.index_put(nz, grads_nz[1])
            if grad_zi is not None:
                grad_zi = grad_zi.index_put(nz, grads_nz[2])
        grad_log_mu *= g
        row_sum = grad_log_mu.sum(-1, keepdim=True)
        grad_logits = grad_log_mu - rho * row_sum
        grad_log_library = row_sum if ctx.needs_input_grad[2] else None
        if grad_log_theta is not None:
            grad_log_theta = grad_log_theta * g if ctx.needs_input_grad[3] else None
            if grad_log_theta is not None and ctx.theta_rows == 1:
                grad_log_theta = grad_log_theta.sum(0, keepdim=True)
        if grad_zi is not None:
            grad_zi = grad_zi * g
        return None, grad_logits, grad_log_library, grad_log_theta, grad_zi, None, None, None, None


def _nonzero_grads(likelihood, x, mu, theta, zi_logits, digamma_theta=None):
    """Gradients of :func:`_nonzero_term` w.r.t. log(mu), log(theta) and zi_logits at nonzeros."""
    if likelihood == "poisson":
        return (x - mu,)
    total = theta + mu
    d_log_mu = x - (theta + x) * mu / total
    theta64 = theta.double()
    if digamma_theta is None:
        digamma_theta = torch.digamma(theta64)
    digamma_diff = (torch.digamma(x.double() + theta64) - digamma_theta).to(x.dtype)
    d_log_theta = theta * (digamma_diff - torch.log1p(mu / theta) + (mu - x) / total)
    if likelihood == "nb":
        return d_log_mu, d_log_theta
    return d_log_mu, d_log_theta, -torch.sigmoid(zi_logits)


class _NativeSoftmaxNB(torch.autograd.Function):
    """The same function as :class:`_SoftmaxCountLogLikelihood` for NB/ZINB on CPU float32, in
    one C pass per cell (:mod:`sclatent._native`) that also writes the gradients.

    ``heads`` is ``(B, G)`` (NB: the logits) or ``(B, 2G)`` (ZINB: logits, then zi_logits), rows
    with unit column stride: a decoder's fused output layer passes its output as is, so its
    gradient comes back as one matrix instead of per-head pieces that autograd would concatenate.
    """

    @staticmethod
    def forward(ctx, kernel, heads, n_genes, log_library, log_theta, row_ptr, cols, values):
        out, grad_heads, grad_log_library, grad_log_theta = native_softmax_nb(
            kernel, heads, n_genes, log_library, log_theta, row_ptr, cols, values, any(ctx.needs_input_grad)
        )
        ctx.theta_rows = log_theta.numel() // n_genes
        ctx.save_for_backward(grad_heads, grad_log_library, grad_log_theta)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_heads, grad_log_library, grad_log_theta = ctx.saved_tensors
        g = grad_out.unsqueeze(-1)
        needs = ctx.needs_input_grad
        # out of place: a retained graph may be differentiated again
        grad_heads = grad_heads * g if needs[1] else None
        grad_log_library = (grad_log_library * grad_out).unsqueeze(-1) if needs[3] else None
        if needs[4]:
            # per-gene dispersion: sum over cells, weighted by each cell's incoming gradient
            grad_log_theta = (grad_out @ grad_log_theta).unsqueeze(0) if ctx.theta_rows == 1 else grad_log_theta * g
        else:
            grad_log_theta = None
        return None, grad_heads, None, grad_log_library, grad_log_theta, None, None, None


def native_softmax_nb(
    kernel,
    heads: torch.Tensor,
    n_genes: int,
    log_library: torch.Tensor,
    log_theta: torch.Tensor,
    row_ptr: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    with_gradients: bool,
    row_coefficients: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One call of the native NB/ZINB kernel: per-cell log-likelihood and, if asked, its gradients.

    Parameters
    ----------
    kernel
        The loaded :mod:`sclatent._native` library.
    heads
        ``(B, G)`` logits (NB) or ``(B, 2G)`` logits then zero-inflation logits (ZINB), CPU float32,
        unit column stride.
    log_library
        ``(B,)`` or ``(B, 1)`` log library size.
    log_theta
        ``(1, G)`` or ``(B, G)`` log inverse dispersion.
    row_ptr, cols, values
        The minibatch's nonzero counts in CSR form (int64, int64, float32; contiguous).
    row_coefficients
        ``(B,)`` float64: each row's ``sum over its nonzeros of lgamma(x + theta) - lgamma(theta) -
        lgamma(x + 1)``, if known (:func:`nb_log_coefficients`); the kernel then skips those special
        functions. Read only without gradients.

    Returns
    -------
    tuple of torch.Tensor
        ``log p(x)`` ``(B,)`` (nats) and, with ``with_gradients``, its gradients: w.r.t. ``heads``
        ``(B, G or 2G)``, ``log_library`` ``(B,)`` and ``log_theta`` per cell ``(B, G)``; else Nones.
    """
    n_cells = heads.shape[0]
    zero_inflated = heads.shape[1] == 2 * n_genes
    log_theta = log_theta.reshape(-1, n_genes).contiguous()
    theta = torch.exp(log_theta)
    log_library = log_library.reshape(n_cells).contiguous()
    out = torch.empty(n_cells, dtype=heads.dtype)
    threads = torch.get_num_threads()
    work = _workspace(4 * threads * n_genes)
    grad_heads = torch.empty(heads.shape, dtype=heads.dtype) if with_gradients else None
    grad_log_library = torch.empty(n_cells, dtype=heads.dtype) if with_gradients else None
    grad_log_theta = torch.empty(n_cells, n_genes, dtype=heads.dtype) if with_gradients else None
    offset = n_genes * heads.element_size()  # the zi_logits columns follow the logits
    # held here: the kernel reads the buffer, so it must outlive the call
    coefficients = None if row_coefficients is None else row_coefficients.to(torch.float64).contiguous()
    kernel.softmax_nb_log_likelihood(
        n_cells,
        n_genes,
        heads.data_ptr(),
        heads.stride(0),
        heads.data_ptr() + offset if zero_inflated else None,
        heads.stride(0),
        log_library.data_ptr(),
        theta.data_ptr(),
        log_theta.data_ptr(),
        0 if log_theta.shape[0] == 1 else n_genes,
        row_ptr.data_ptr(),
        cols.data_ptr(),
        values.data_ptr(),
        None if coefficients is None else coefficients.data_ptr(),
        out.data_ptr(),
        work.data_ptr(),
        None if grad_heads is None else grad_heads.data_ptr(),
        None if grad_log_library is None else grad_log_library.data_ptr(),
        None if grad_log_theta is None else grad_log_theta.data_ptr(),
        grad_heads.data_ptr() + offset if with_gradients and zero_inflated else None,
        heads.shape[1],
        threads,
    )
    return out, grad_heads, grad_log_library, grad_log_theta


def _heads_matrix(logits: torch.Tensor, zi_logits: torch.Tensor | None) -> torch.Tensor:
    """``logits`` and ``zi_logits`` side by side as one ``(B, G or 2G)`` matrix: the decoder output
    they are column slices of when they are (no copy), else a concatenation."""
    n_genes = logits.shape[1]
    if zi_logits is None:
        return logits if logits.stride(-1) == 1 else logits.contiguous()
    base = logits._base
    if (
        base is not None
        and zi_logits._base is base
        and base.dim() == 2
        and base.shape == (logits.shape[0], 2 * n_genes)
        and base.stride(-1) == 1
        and logits.data_ptr() == base.data_ptr()
        and zi_logits.data_ptr() == base.data_ptr() + n_genes * base.element_size()
        and logits.stride() == zi_logits.stride() == base.stride()
        # the base's gradient must be the views' gradient: not so for views that are autograd leaves
        # of their own (taken under no_grad, or given requires_grad after the split)
        and all((t.grad_fn is not None) == t.requires_grad == base.requires_grad for t in (logits, zi_logits))
    ):
        return base
    return torch.cat([logits, zi_logits], dim=-1)


_scratch = threading.local()


def _workspace(numel: int) -> torch.Tensor:
    """A float32 CPU scratch buffer of at least ``numel`` entries, reused across calls (per thread):
    the kernel's intermediates never leave it, and a fresh multi-MB allocation each step costs
    page faults."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _scratch.buffer = torch.empty(numel, dtype=torch.float32)
    return buffer


def _native_kernel(likelihood, logits, log_library, log_theta, zi_logits):
    """The native kernel when it applies to these inputs (NB/ZINB, 2-D, CPU float32), else None."""
    if likelihood == "poisson" or logits.dim() != 2 or logits.device.type != "cpu":
        return None
    tensors = [t for t in (logits, log_library, log_theta, zi_logits) if t is not None]
    if any(t.dtype != torch.float32 for t in tensors):
        return None
    if log_theta.numel() not in (logits.shape[1], logits.numel()) or log_library.numel() != logits.shape[0]:
        return None
    return _native.kernels(logits.device, logits.dtype)


def nb_log_coefficients(
    log_theta: torch.Tensor, nz_row: torch.Tensor, nz_col: torch.Tensor, nz_val: torch.Tensor, n_cells: int
) -> torch.Tensor:
    """``(B,)`` float64: per cell, the sum over its nonzero counts of the NB coefficient
    ``log Gamma(x + theta) - log Gamma(theta) - log Gamma(x + 1)`` (nats), the part of ``log NB(x)``
    that depends on neither the mean nor the zero inflation.

    Parameters
    ----------
    log_theta
        Log inverse dispersion, ``(1, G)`` (per gene) or ``(B, G)`` (per cell: batch or label rows).
    nz_row, nz_col, nz_val
        The cells' nonzero counts.
    n_cells
        ``B``.
    """
    rows = torch.zeros_like(nz_row) if log_theta.shape[0] == 1 else nz_row
    # theta as the kernel sees it (float32), the special functions in float64 as the kernel's
    theta = torch.exp(log_theta.detach())[rows, nz_col].to(torch.float64)
    x = nz_val.to(torch.float64)
    terms = torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1.0)
    return torch.zeros(n_cells, dtype=torch.float64, device=terms.device).index_add_(0, nz_row, terms)


def softmax_count_log_likelihood(
    likelihood: str,
    logits: torch.Tensor,
    log_library: torch.Tensor,
    log_theta: torch.Tensor | None,
    zi_logits: torch.Tensor | None,
    nz_row: torch.Tensor,
    nz_col: torch.Tensor,
    nz_val: torch.Tensor,
    nz_log_factorial: torch.Tensor | None = None,
    nz_row_ptr: torch.Tensor | None = None,
    log_coefficients: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-cell log-likelihood with mean ``softmax(logits) * exp(log_library)``; the training path.

    Equal in value and gradient to ``count_log_likelihood(likelihood,
    log_softmax(logits) + log_library, exp(log_theta), zi_logits, ...)`` (tested). On CPU in
    float32, NB and ZINB run in the fused C kernel of :mod:`sclatent._native` when it could be
    built (~8x faster than the torch code here, which is the fallback and the reference).

    Parameters
    ----------
    logits
        ``(B, G)`` decoder output before the softmax over genes.
    log_library
        ``(B, 1)`` log library size.
    log_theta
        Log inverse dispersion, ``(1, G)`` or ``(B, G)``; ``None`` for Poisson.
    zi_logits
        ``(B, G)`` zero-inflation logits; ZINB only.
    nz_row, nz_col, nz_val
        The minibatch's nonzero counts.
    nz_log_factorial
        ``lgamma(nz_val + 1)`` if known (the loaders precompute it); computed otherwise.
    nz_row_ptr
        ``(B + 1,)`` CSR row pointer of the nonzeros (which must then be sorted by row), as the
        loaders give it; computed from ``nz_row`` when needed and not given.
    log_coefficients
        ``(B,)`` the NB coefficients' per-cell sums (:func:`nb_log_coefficients`) when the caller
        has them: rows repeating one cell under several latent samples share them, and the C kernel
        then skips their special functions (without gradients; ignored elsewhere).

    Returns
    -------
    torch.Tensor
        ``(B,)`` log-likelihood per cell, nats.
    """
    _check_likelihood(likelihood)
    kernel = _native_kernel(likelihood, logits, log_library, log_theta, zi_logits)
    if kernel is not None:
        if nz_row_ptr is None:
            order = torch.argsort(nz_row, stable=True)
            nz_row, nz_col, nz_val = nz_row[order], nz_col[order], nz_val[order]
            nz_row_ptr = torch.zeros(logits.shape[0] + 1, dtype=torch.int64)
            torch.cumsum(torch.bincount(nz_row, minlength=logits.shape[0]), 0, out=nz_row_ptr[1:])
        inputs = (
            kernel,
            _heads_matrix(logits, zi_logits),
            logits.shape[1],
            log_library,
            log_theta,
            # the kernel reads int64 indices: any other integer type would be read out of bounds
            nz_row_ptr.to(torch.int64).contiguous(),
            nz_col.to(torch.int64).contiguous(),
            nz_val.to(logits.dtype).contiguous(),
        )
        differentiable = (logits, log_library, log_theta, zi_logits)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable):
            return _NativeSoftmaxNB.apply(*inputs)
        # evaluation (no_grad): the kernel skips the gradients, which autograd.Function would still
        # ask for (its needs_input_grad follows requires_grad, not the grad mode)
        return native_softmax_nb(*inputs, False, log_coefficients)[0]
    return _SoftmaxCountLogLikelihood.apply(
        likelihood, logits, log_library, log_theta, zi_logits, nz_row, nz_col, nz_val, nz_log_factorial
    )
