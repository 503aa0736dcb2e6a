"""Tests for the native kernels (sclatent._native) and the fast paths built on them.

The fused softmax + NB/ZINB likelihood is checked against the autograd reference
:func:`sclatent.distributions.count_log_likelihood` evaluated in float64; ``SparseLinear`` against a
dense matmul; ``FlatAdam`` against ``torch.optim.Adam``; the chunked minibatch loader against
gathering each minibatch on its own. The fallbacks run with the native kernels disabled (in a fresh
process: the library is loaded once per process) and unbuildable (no compiler).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import sclatent.data.loader as loader
from sclatent import _native
from sclatent import distributions as D
from sclatent.data import CellData, setup_anndata
from sclatent.nn import SparseLinear, SparseRows
from sclatent.optim import FlatAdam


def test_native_library_loads_on_linux_with_a_compiler():
    """CI must notice when the C build breaks: everything else here would silently skip."""
    if not sys.platform.startswith("linux") or not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no Linux C compiler")
    if os.environ.get("SCLATENT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        pytest.skip("native kernels disabled by SCLATENT_NATIVE")
    assert _native.library() is not None, _native.native_status()
    assert "loaded" in _native.native_status()


# ----------------------------------------------------------------------------- likelihood inputs

# counts exercising every branch of the kernel: 1..8 (finite sums), 9 and up (lgamma), non-integers
SPECIAL_COUNTS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 50, 3000, 1.5, 0.5, 7.5, 12.25]


def _likelihood_inputs(theta_shape: str, B: int = 7, G: int = 24, seed: int = 0):
    """float32 leaves and a count matrix with extreme but valid parameters at zeros and nonzeros."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(2.0, (B, G)).astype(np.float64)
    x[rng.random((B, G)) < 0.4] = 0.0
    x[0] = 0.0  # an empty cell
    x[1, : len(SPECIAL_COUNTS)] = SPECIAL_COUNTS
    x[2, -len(SPECIAL_COUNTS) :] = SPECIAL_COUNTS[::-1]
    logits = rng.normal(0.0, 1.5, (B, G))
    logits[3, :4] = [-30.0, -60.0, -30.0, -60.0]  # mu ~ 1e-13 and ~ 1e-26
    logits[2, -3:] = -25.0  # tiny mu at counts of 1.5, 3000 and 50
    x[3, :2] = [3.0, 1.0]  # ... at a nonzero count too
    log_library = np.log(rng.uniform(10.0, 2e4, (B, 1)))
    log_library[1] = np.log(1e5)
    rows = 1 if theta_shape == "1G" else B
    log_theta = rng.normal(0.0, 2.0, (rows, G))
    log_theta[:, 0:3] = 10.0  # nearly Poisson, at counts 1, 2, 3 (and 9..) in row 1
    log_theta[:, 9:12] = -10.0  # extremely overdispersed at counts 50, 3000, 1.5
    log_theta[:, 20] = 10.0
    log_theta[:, 21] = -10.0
    zi = rng.normal(0.0, 2.0, (B, G))
    zi[:, 4] = 30.0
    zi[:, 5] = -30.0
    zi[4:, 12:16] = 30.0  # at zeros and nonzeros alike
    zi[2, 10:14] = -30.0

    def leaf(a):
        return torch.tensor(a, dtype=torch.float32).requires_grad_()

    x = torch.tensor(x, dtype=torch.float32)
    return leaf(logits), leaf(log_library), leaf(log_theta), leaf(zi), x


def _reference(likelihood, logits, log_library, log_theta, zi, x):
    """count_log_likelihood in float64 (autograd through the casts back to the float32 leaves)."""
    r, c = x.nonzero(as_tuple=True)
    log_mu = torch.log_softmax(logits.double(), -1) + log_library.double()
    theta = torch.exp(log_theta.double())
    z = zi.double() if likelihood == "zinb" else None
    return D.count_log_likelihood(likelihood, log_mu, theta, z, r, c, x[r, c].double())


def _assert_values_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    expected = expected.detach().double()
    error = (actual.detach().double() - expected).abs()
    bound = rtol * expected.abs() + 1e-7 * expected.abs().max()
    assert torch.isfinite(actual).all()
    assert (error <= bound).all(), f"max relative error {(error / expected.abs()).max():.3g}"


def _assert_gradient_close(actual: torch.Tensor, expected: torch.Tensor, name: str, tol: float = 1e-5) -> None:
    assert actual.shape == expected.shape, name
    assert torch.isfinite(actual).all(), name
    scale = expected.abs().max().clamp_min(1e-30)
    error = (actual.double() - expected.double()).abs().max() / scale
    assert error <= tol, f"{name}: max error {error:.3g} of the gradient's max {scale:.3g}"


def _nonzeros(x: torch.Tensor, shuffled: bool, seed: int = 0):
    """Coordinates of x's nonzeros: sorted by row with a CSR row pointer, or in random order without."""
    r, c = x.nonzero(as_tuple=True)
    if shuffled:
        order = torch.randperm(r.numel(), generator=torch.Generator().manual_seed(seed))
        return r[order], c[order], x[r, c][order], None
    row_ptr = torch.zeros(x.shape[0] + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(torch.bincount(r, minlength=x.shape[0]), 0)
    return r, c, x[r, c], row_ptr


def _backward_name(out: torch.Tensor) -> str:
    return type(out.grad_fn).__name__


# ----------------------------------------------------------------------------- native likelihood


@pytest.mark.needs_native
@pytest.mark.parametrize("row_ptr", ["given", "shuffled"])
@pytest.mark.parametrize("theta_shape", ["1G", "BG"])
@pytest.mark.parametrize("likelihood", ["zinb", "nb"])
def test_native_likelihood_matches_reference(likelihood, theta_shape, row_ptr):
    logits, log_library, log_theta, zi, x = _likelihood_inputs(theta_shape)
    z = zi if likelihood == "zinb" else None
    leaves = [t for t in (logits, log_library, log_theta, z) if t is not None]
    r, c, v, ptr = _nonzeros(x, shuffled=row_ptr == "shuffled")
    out = D.softmax_count_log_likelihood(likelihood, logits, log_library, log_theta, z, r, c, v, nz_row_ptr=ptr)
    assert _backward_name(out).startswith("_NativeSoftmaxNB")  # not silently the torch path
    assert out.dtype == torch.float32 and out.shape == (x.shape[0],)
    ref = _reference(likelihood, logits, log_library, log_theta, zi, x)
    assert ref.abs().max() > 1e3  # the test covers large magnitudes
    _assert_values_close(out, ref)
    # a non-uniform upstream gradient, of both signs: per-cell weighting is checked too
    weights = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * weights).sum(), leaves)
    expected = torch.autograd.grad((ref * weights.double()).sum(), leaves)
    for name, leaf, a, b in zip(["logits", "log_library", "log_theta", "zi_logits"], leaves, grads, expected):
        assert a.shape == leaf.shape and a.dtype == torch.float32, name
        _assert_gradient_close(a, b, name)


@pytest.mark.needs_native
@pytest.mark.parametrize("theta_shape", ["1G", "BG"])
@pytest.mark.parametrize("likelihood", ["zinb", "nb"])
def test_native_likelihood_lgamma_path_entrywise(likelihood, theta_shape):
    """Counts past the small-integer sums (> 8 or non-integer) with moderate dispersions and a mean that
    fits them: every gradient entry is checked on its own scale (the digamma series included). A
    gene-wise theta (``1G``) takes the kernel's per-gene terms (the sums for counts 1..8 tabulated
    once per gene, the asymptotic series past 8); a per-cell one (``BG``) the per-entry path.

    Well-fitted large counts cancel in float32 (x log mu against lgamma terms of ~1e4): values agree to
    ~3e-5 relative here, as does the torch float32 path.
    """
    rng = np.random.default_rng(0)
    B, G = 4, 12
    counts = np.array([9, 50, 3000, 1.5, 12.25, 0.5, 7.5, 20, 3, 0, 200, 11], dtype=np.float64)
    x = np.stack([np.roll(counts, k) for k in range(B)])

    def leaf(a):
        return torch.tensor(a, dtype=torch.float32).requires_grad_()

    logits = leaf(np.log(x + 1.0) + rng.normal(0.0, 0.5, (B, G)))
    log_library = leaf(np.log(x.sum(1, keepdims=True)))
    log_theta = rng.uniform(-1.5, 2.5, (1 if theta_shape == "1G" else B, G))
    if theta_shape == "1G":
        # theta ~2e6: past the tabulated sums' range, so this gene's entries take the per-entry path
        # (summed over cells its gradient is on the scale checked; per cell it is float32 noise)
        log_theta[:, 1] = 14.5
    log_theta = leaf(log_theta)
    zi = leaf(rng.normal(0.0, 1.0, (B, G)))
    x = torch.tensor(x, dtype=torch.float32)
    z = zi if likelihood == "zinb" else None
    leaves = [t for t in (logits, log_library, log_theta, z) if t is not None]
    r, c, v, ptr = _nonzeros(x, shuffled=False)
    out = D.softmax_count_log_likelihood(likelihood, logits, log_library, log_theta, z, r, c, v, nz_row_ptr=ptr)
    ref = _reference(likelihood, logits, log_library, log_theta, zi, x)
    _assert_values_close(out, ref, rtol=1e-4)
    weights = torch.randn(B, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * weights).sum(), leaves)
    expected = torch.autograd.grad((ref * weights.double()).sum(), leaves)
    for name, a, b in zip(["logits", "log_library", "log_theta", "zi_logits"], grads, expected):
        a, b = a.double(), b.double()
        error = ((a - b).abs() / (b.abs() + 1e-3 * b.abs().max())).max()
        assert error < 5e-4, f"{name}: entrywise relative error {error:.3g}"


@pytest.mark.needs_native
@pytest.mark.parametrize("likelihood", ["zinb", "nb"])
def test_native_likelihood_with_several_threads(likelihood):
    """Rows are split across OpenMP threads, each with its own scratch rows: same result as one thread
    (big enough that the threads run at the same time)."""
    logits, log_library, log_theta, zi, x = _likelihood_inputs("BG", B=32, G=1500)
    z = zi if likelihood == "zinb" else None
    leaves = [t for t in (logits, log_library, log_theta, z) if t is not None]
    r, c, v, ptr = _nonzeros(x, shuffled=False)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            out = D.softmax_count_log_likelihood(likelihood, logits, log_library, log_theta, z, r, c, v, nz_row_ptr=ptr)
            results.append((out.detach(), torch.autograd.grad(out.sum(), leaves)))
    finally:
        torch.set_num_threads(previous)
    (out1, grads1), (out3, grads3) = results
    torch.testing.assert_close(out3, out1, rtol=1e-6, atol=0)
    for a, b in zip(grads3, grads1):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.needs_native
def test_native_likelihood_accepts_int32_indices():
    """count_log_likelihood takes any integer index tensors; so must the native path (it reads int64)."""
    logits, log_library, log_theta, zi, x = _likelihood_inputs("1G")
    r, c, v, ptr = _nonzeros(x, shuffled=False)
    expected = D.softmax_count_log_likelihood("zinb", logits, log_library, log_theta, zi, r, c, v, nz_row_ptr=ptr)
    for kwargs in ({"nz_row_ptr": ptr.int()}, {}):
        out = D.softmax_count_log_likelihood("zinb", logits, log_library, log_theta, zi, r.int(), c.int(), v, **kwargs)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.needs_native
@pytest.mark.parametrize("likelihood", ["zinb", "nb"])
def test_native_likelihood_without_grad_gives_the_same_values(likelihood):
    logits, log_library, log_theta, zi, x = _likelihood_inputs("1G")
    z = zi if likelihood == "zinb" else None
    r, c, v, ptr = _nonzeros(x, shuffled=False)
    with_grad = D.softmax_count_log_likelihood(likelihood, logits, log_library, log_theta, z, r, c, v, nz_row_ptr=ptr)
    with torch.no_grad():
        without = D.softmax_count_log_likelihood(likelihood, logits, log_library, log_theta, z, r, c, v, nz_row_ptr=ptr)
    assert with_grad.requires_grad and not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-6, atol=0)
    # inputs that need no gradient at all (grad mode on) take the same no-gradient path
    detached = [t.detach() if t is not None else None for t in (logits, log_library, log_theta, z)]
    plain = D.softmax_count_log_likelihood(likelihood, *detached, r, c, v, nz_row_ptr=ptr)
    assert not plain.requires_grad
    torch.testing.assert_close(plain, with_grad.detach(), rtol=1e-6, atol=0)


@pytest.mark.needs_native
@pytest.mark.parametrize("theta_shape", ["1G", "BG"])
@pytest.mark.parametrize("likelihood", ["zinb", "nb"])
def test_known_count_coefficients_leave_the_likelihood_unchanged(likelihood, theta_shape):
    """nb_log_coefficients sums lgamma(x + theta) - lgamma(theta) - lgamma(x + 1) per cell (checked
    against scipy), and the kernel handed them (it then skips those special functions, as
    get_marginal_ll does for its repeated rows) gives the same log-likelihood; shifted ones show
    up one for one, so the kernel does read them."""
    from scipy.special import gammaln

    logits, log_library, log_theta, zi, x = _likelihood_inputs(theta_shape)
    z = zi if likelihood == "zinb" else None
    r, c, v, ptr = _nonzeros(x, shuffled=False)
    coefficients = D.nb_log_coefficients(log_theta, r, c, v, x.shape[0])
    theta = torch.exp(log_theta.detach()).double().numpy()  # float32 theta, as the kernel sees it
    rows = np.zeros_like(r.numpy()) if theta.shape[0] == 1 else r.numpy()
    t, counts = theta[rows, c.numpy()], v.numpy().astype(np.float64)
    expected = np.bincount(r.numpy(), gammaln(counts + t) - gammaln(t) - gammaln(counts + 1), minlength=x.shape[0])
    np.testing.assert_allclose(coefficients.numpy(), expected, rtol=1e-10, atol=1e-9)
    args = (likelihood, logits, log_library, log_theta, z, r, c, v)
    with torch.no_grad():
        computed = D.softmax_count_log_likelihood(*args, nz_row_ptr=ptr)
        given = D.softmax_count_log_likelihood(*args, nz_row_ptr=ptr, log_coefficients=coefficients)
        shifted = D.softmax_count_log_likelihood(*args, nz_row_ptr=ptr, log_coefficients=coefficients + 1.0)
    torch.testing.assert_close(given, computed, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(shifted - given, torch.ones_like(given), rtol=0, atol=1e-3)


@pytest.mark.needs_native
def test_native_likelihood_gradient_for_some_inputs_only():
    """A fixed library size and dispersion (no grad) still give the logits' and zi's gradients."""
    logits, log_library, log_theta, zi, x = _likelihood_inputs("1G")
    log_library, log_theta = log_library.detach(), log_theta.detach()
    r, c, v, _ = _nonzeros(x, shuffled=False)
    out = D.softmax_count_log_likelihood("zinb", logits, log_library, log_theta, zi, r, c, v)
    ref = _reference("zinb", logits, log_library, log_theta, zi, x)
    weights = torch.linspace(-1.0, 2.0, x.shape[0])
    grads = torch.autograd.grad((out * weights).sum(), [logits, zi])
    expected = torch.autograd.grad((ref * weights.double()).sum(), [logits, zi])
    for name, a, b in zip(["logits", "zi_logits"], grads, expected):
        _assert_gradient_close(a, b, name)


@pytest.mark.needs_native
def test_native_dispersion_gradient_when_theta_exceeds_mu():
    """Genes close to Poisson (theta ~ 1e3, mu ~ 0.1..20): the regime a trained model reaches for many genes."""
    B, G = 4, 64
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B, G, generator=gen)
    log_library = torch.full((B, 1), float(np.log(100.0)))
    log_theta = torch.full((1, G), 7.0, requires_grad=True)
    x = torch.zeros(B, G)
    x[0, :5] = torch.tensor([1.0, 2.0, 3.0, 1.0, 5.0])
    r, c = x.nonzero(as_tuple=True)
    out = D.softmax_count_log_likelihood("nb", logits, log_library, log_theta, None, r, c, x[r, c])
    assert _backward_name(out).startswith("_NativeSoftmaxNB")
    ref = _reference("nb", logits, log_library, log_theta, None, x)
    _assert_values_close(out, ref)
    (grad,) = torch.autograd.grad(out.sum(), log_theta)
    (expected,) = torch.autograd.grad(ref.sum(), log_theta)
    relative = (grad.double() - expected.double()).abs() / expected.double().abs()
    assert relative.median() < 1e-3, f"median relative error {relative.median():.3g}"
    _assert_gradient_close(grad, expected, "log_theta")


@pytest.mark.needs_native
def test_native_likelihood_backward_twice_with_retain_graph():
    logits, log_library, log_theta, zi, x = _likelihood_inputs("1G")
    r, c, v, _ = _nonzeros(x, shuffled=False)
    out = D.softmax_count_log_likelihood("zinb", logits, log_library, log_theta, zi, r, c, v)
    weighted = (out * torch.linspace(-1.0, 2.0, x.shape[0])).sum()
    (first,) = torch.autograd.grad(weighted, logits, retain_graph=True)
    (second,) = torch.autograd.grad(weighted, logits)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# ----------------------------------------------------------------------------- fused decoder heads


@pytest.mark.needs_native
@pytest.mark.parametrize("theta_shape", ["1G", "BG"])
def test_fused_heads_pass_the_decoder_output_without_copy(theta_shape):
    logits0, log_library, log_theta, zi0, x = _likelihood_inputs(theta_shape)
    B, G = logits0.shape
    base = torch.cat([logits0, zi0], dim=-1).detach().requires_grad_()
    logits, zi = base.split(G, -1)
    assert D._heads_matrix(logits, zi) is base
    r, c, v, ptr = _nonzeros(x, shuffled=False)
    out = D.softmax_count_log_likelihood("zinb", logits, log_library, log_theta, zi, r, c, v, nz_row_ptr=ptr)
    ref = _reference("zinb", logits, log_library, log_theta, zi, x)
    _assert_values_close(out, ref)
    weights = torch.randn(B, generator=torch.Generator().manual_seed(2))
    leaves = [base, log_library, log_theta]
    grads = torch.autograd.grad((out * weights).sum(), leaves)
    expected = torch.autograd.grad((ref * weights.double()).sum(), leaves)
    for name, a, b in zip(["base", "log_library", "log_theta"], grads, expected):
        _assert_gradient_close(a, b, name)
    # the two halves of the gradient are the logits' and the zi_logits' own
    _assert_gradient_close(grads[0][:, G:], expected[0][:, G:], "zi half")
    assert grads[0][:, G:].abs().max() > 0


@pytest.mark.needs_native
def test_non_adjacent_heads_are_concatenated_with_correct_gradients():
    logits0, log_library, log_theta, zi0, x = _likelihood_inputs("1G")
    B, G = logits0.shape
    # zi_logits first, logits second: column slices of one matrix, but in the wrong order
    base = torch.cat([zi0, logits0], dim=-1).detach().requires_grad_()
    zi, logits = base.split(G, -1)
    heads = D._heads_matrix(logits, zi)
    assert heads is not base
    assert torch.equal(heads, torch.cat([logits, zi], -1))
    # and with a gap between them
    wide = torch.cat([logits0, torch.zeros(B, 1), zi0], dim=-1).detach().requires_grad_()
    gapped = (wide[:, :G], wide[:, G + 1 :])
    assert D._heads_matrix(*gapped) is not wide
    r, c, v, ptr = _nonzeros(x, shuffled=False)
    weights = torch.randn(B, generator=torch.Generator().manual_seed(3))
    for leaf, (lg, z) in ((base, (logits, zi)), (wide, gapped)):
        out = D.softmax_count_log_likelihood("zinb", lg, log_library, log_theta, z, r, c, v, nz_row_ptr=ptr)
        ref = _reference("zinb", lg, log_library, log_theta, z, x)
        _assert_values_close(out, ref)
        (grad,) = torch.autograd.grad((out * weights).sum(), leaf)
        (expected,) = torch.autograd.grad((ref * weights.double()).sum(), leaf)
        _assert_gradient_close(grad, expected, "heads")


@pytest.mark.needs_native
def test_nb_logits_with_a_row_stride():
    """NB logits as a column slice of a wider matrix (row stride != G) are read in place, correctly."""
    logits0, log_library, log_theta, _, x = _likelihood_inputs("1G")
    B, G = logits0.shape
    wide = torch.cat([logits0, torch.randn(B, 5)], dim=-1).detach().requires_grad_()
    logits = wide[:, :G]
    assert logits.stride() == (G + 5, 1)
    r, c, v, ptr = _nonzeros(x, shuffled=False)
    out = D.softmax_count_log_likelihood("nb", logits, log_library, log_theta, None, r, c, v, nz_row_ptr=ptr)
    ref = _reference("nb", logits, log_library, log_theta, None, x)
    _assert_values_close(out, ref)
    (grad,) = torch.autograd.grad(out.sum(), wide)
    (expected,) = torch.autograd.grad(ref.sum(), wide)
    _assert_gradient_close(grad, expected, "wide")
    assert torch.equal(grad[:, G:], torch.zeros(B, 5))


@pytest.mark.needs_native
def test_heads_of_a_base_with_other_grad_requirements_are_not_fused():
    """Views whose requires_grad differs from their base's must not be swapped for the base: the
    gradient would miss the views (base without grad) or leak into the base (views made under no_grad)."""
    logits0, log_library, log_theta, zi0, x = _likelihood_inputs("1G")
    G = logits0.shape[1]
    r, c, v, ptr = _nonzeros(x, shuffled=False)
    log_library, log_theta = log_library.detach(), log_theta.detach()

    def likelihood(logits, zi):
        return D.softmax_count_log_likelihood("zinb", logits, log_library, log_theta, zi, r, c, v, nz_row_ptr=ptr)

    # leaves split off a matrix that needs no gradient: they must get theirs
    plain = torch.cat([logits0, zi0], dim=-1).detach()
    logits, zi = plain.split(G, -1)
    logits.requires_grad_()
    zi.requires_grad_()
    assert D._heads_matrix(logits, zi) is not plain
    likelihood(logits, zi).sum().backward()
    ref = _reference("zinb", logits0, log_library, log_theta, zi0, x)
    expected = torch.autograd.grad(ref.sum(), [logits0, zi0])
    for name, leaf, b in zip(["logits", "zi_logits"], (logits, zi), expected):
        assert leaf.grad is not None, name
        _assert_gradient_close(leaf.grad, b, name)
    # views taken under no_grad of a matrix that needs a gradient: nothing may flow back into it
    base = torch.cat([logits0, zi0], dim=-1).detach().requires_grad_()
    with torch.no_grad():
        logits, zi = base.split(G, -1)
    assert logits.requires_grad and logits.is_leaf  # detached from the base by autograd
    assert D._heads_matrix(logits, zi) is not base
    likelihood(logits, zi).sum().backward()
    assert base.grad is None
    # the ordinary case still fuses
    assert D._heads_matrix(*base.split(G, -1)) is base


# ----------------------------------------------------------------------------- fallbacks


def _zinb_fallback_check():
    """float32 ZINB through softmax_count_log_likelihood: the torch path, equal to the float64 reference."""
    gen = torch.Generator().manual_seed(0)
    B, G = 5, 9
    x = torch.poisson(torch.full((B, G), 1.5), generator=gen)
    x[0, :3] = torch.tensor([50.0, 3000.0, 1.5])
    r, c = x.nonzero(as_tuple=True)
    logits = torch.randn(B, G, generator=gen, requires_grad=True)
    log_library = (torch.rand(B, 1, generator=gen) * 5 + 2).requires_grad_()
    log_theta = torch.randn(1, G, generator=gen, requires_grad=True)
    zi = torch.randn(B, G, generator=gen, requires_grad=True)
    leaves = [logits, log_library, log_theta, zi]
    out = D.softmax_count_log_likelihood("zinb", logits, log_library, log_theta, zi, r, c, x[r, c])
    assert type(out.grad_fn).__name__.startswith("_SoftmaxCountLogLikelihood"), out.grad_fn
    log_mu = torch.log_softmax(logits.double(), -1) + log_library.double()
    ref = D.count_log_likelihood("zinb", log_mu, log_theta.double().exp(), zi.double(), r, c, x[r, c].double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    w = torch.randn(B, generator=gen)
    for a, b in zip(torch.autograd.grad((out * w).sum(), leaves), torch.autograd.grad((ref * w).sum(), leaves)):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (a, b)


def test_native_disabled_by_environment_variable(repo):
    """A fresh process (the library is loaded once per process) with SCLATENT_NATIVE=0: every fast path
    falls back to torch and still computes the right thing."""
    code = f"""
        import sys
        import numpy as np, scipy.sparse as sp, anndata as ad, torch
        torch.set_num_threads(1)
        import sclatent
        from sclatent import _native, distributions as D
        from sclatent.data import CellData, setup_anndata
        from sclatent.nn import SparseLinear, SparseRows
        assert _native.library() is None
        print(_native.native_status())
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_kernels import _zinb_fallback_check
        _zinb_fallback_check()
        counts = np.random.default_rng(0).poisson(1.0, (11, 6)).astype(np.float32)
        counts[:, 0] += 1
        adata = ad.AnnData(sp.csr_matrix(counts))
        data = CellData(adata, setup_anndata(adata))
        batches = list(data.iterate(np.arange(11), 4, shuffle=True, generator=torch.Generator().manual_seed(0)))
        order = torch.cat([mb.cell_index for mb in batches]).numpy()
        assert np.array_equal(torch.cat([mb.counts for mb in batches]).numpy(), counts[order])
        mb = batches[0]
        layer = SparseLinear(6, 3)
        out = layer(SparseRows(mb.nz_row_ptr, mb.nz_col, mb.nz_val, 6))
        assert "Native" not in type(out.grad_fn).__name__
        torch.testing.assert_close(out, mb.counts @ layer.weight + layer.bias)
        print("fallbacks ok")
        """
    environment = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "SCLATENT_NATIVE": "0"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=environment, cwd=repo, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SCLATENT_NATIVE" in result.stdout and "fallbacks ok" in result.stdout


def test_without_a_compiler_the_torch_path_gives_the_reference(monkeypatch, tmp_path):
    """CC pointing nowhere and an empty cache: no library, and the likelihood falls back to torch.

    In this process, with the module's load state reset (and restored afterwards): a subprocess would
    spend most of its time importing torch.
    """
    monkeypatch.setattr(_native, "_library", None)
    monkeypatch.setattr(_native, "_status", None)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("SCLATENT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SCLATENT_NATIVE", raising=False)
    assert _native.library() is None
    status = _native.native_status()
    assert "unavailable" in status and "/nonexistent/cc" in status, status
    _zinb_fallback_check()
    # the failed build leaves no partial files behind in the cache
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


# ----------------------------------------------------------------------------- SparseLinear


def _sparse_input(B: int = 9, n_in: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    dense = rng.poisson(1.0, (B, n_in)).astype(np.float32) * (rng.random((B, n_in)) < 0.3)
    dense[2] = 0.0  # empty rows, one at the end
    dense[-1] = 0.0
    dense[4] = rng.uniform(0.5, 5.0, n_in)  # a row with every entry nonzero
    dense = torch.tensor(dense)
    r, c = dense.nonzero(as_tuple=True)
    return dense, SparseRows.from_coordinates(r, c, dense[r, c], B, n_in)


@pytest.mark.needs_native
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n_out", [19, 5, 64, 137])  # 64 and 137: the kernel's 64-column register blocks (and a tail)
def test_sparse_linear_matches_dense(n_out, bias, threads):
    dense, rows = _sparse_input()
    assert torch.equal(rows.to_dense(), dense)
    torch.manual_seed(0)
    layer = SparseLinear(dense.shape[1], n_out, bias=bias)
    upstream = torch.randn(dense.shape[0], n_out, generator=torch.Generator().manual_seed(1))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = layer(rows)
        params = [p for p in (layer.weight, layer.bias) if p is not None]
        grads = torch.autograd.grad((out * upstream).sum(), params)
    finally:
        torch.set_num_threads(previous)
    assert _backward_name(out).startswith("_NativeSparseLinear")
    reference = dense.double() @ layer.weight.double()
    if bias:
        reference = reference + layer.bias.double()
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(out[2], layer.bias.detach())  # an empty row is the bias alone
    else:
        assert torch.equal(out[2], torch.zeros(n_out))
    expected = torch.autograd.grad((reference * upstream.double()).sum(), params)
    for a, b in zip(grads, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)
    # the dense-input path gives the same output
    torch.testing.assert_close(layer(dense), out, rtol=1e-5, atol=1e-5)


def test_sparse_linear_dense_fallback_for_float64():
    dense, rows = _sparse_input()
    layer = SparseLinear(dense.shape[1], 6).double()
    values = rows.values.double()
    out = layer(SparseRows(rows.row_ptr, rows.cols, values, rows.n_cols))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, dense.double() @ layer.weight + layer.bias, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    torch.testing.assert_close(layer.weight.grad, dense.double().sum(0)[:, None].expand(-1, 6))


@pytest.mark.needs_native
def test_sparse_linear_accepts_int32_columns():
    dense, rows = _sparse_input()
    layer = SparseLinear(dense.shape[1], 7)
    out = layer(SparseRows(rows.row_ptr.int(), rows.cols.int(), rows.values, rows.n_cols))
    torch.testing.assert_close(out, dense @ layer.weight + layer.bias, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- FlatAdam


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _train(model, optimizer, steps: int = 20) -> list[float]:
    gen = torch.Generator().manual_seed(4)
    losses = []
    for _ in range(steps):
        inputs, target = torch.randn(16, 5, generator=gen), torch.randn(16, 3, generator=gen)
        optimizer.zero_grad()
        loss = ((model(inputs) - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("fused", [True, False])
def test_flat_adam_matches_torch_adam(fused):
    settings = {"lr": 0.03, "eps": 1e-6, "weight_decay": 0.05}
    model, reference = _mlp(), _mlp()
    optimizer = FlatAdam(list(model.parameters()), **settings)
    if fused:
        if not hasattr(torch, "_fused_adam_"):
            pytest.skip("no fused Adam kernel in this torch")
        assert optimizer._fused
    else:
        optimizer._fused = False
    # parameters are views into one buffer while the optimiser holds them
    assert optimizer.flat is not None
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1
    losses = _train(model, optimizer)
    expected = _train(reference, torch.optim.Adam(reference.parameters(), **settings))
    assert optimizer._fused == fused  # the fused kernel really ran (or really did not)
    np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0]
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    values = [p.detach().clone() for p in model.parameters()]
    optimizer.release()
    assert optimizer.flat is None
    pointers = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(pointers)) == len(pointers)
    for p, value in zip(model.parameters(), values):
        assert p.grad is None
        assert torch.equal(p, value)
    optimizer.release()  # a second release is a no-op
    # the released parameters train on with an ordinary optimiser
    assert _train(model, torch.optim.SGD(model.parameters(), lr=0.01), steps=2)


def test_flat_adam_mixed_dtypes_use_the_fallback_and_train():
    model = _mlp()
    model[2].double()
    optimizer = FlatAdam(list(model.parameters()), lr=0.03)
    assert optimizer._fallback is not None and optimizer.flat is None
    before = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(4)
    inputs, target = torch.randn(32, 5, generator=gen), torch.randn(32, 3, generator=gen, dtype=torch.float64)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = ((model[2](model[1](model[0](inputs)).double()) - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    trained = [p.detach().clone() for p in model.parameters()]
    optimizer.release()  # nothing to give back
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))


# ----------------------------------------------------------------------------- chunked minibatches

N_CELLS, N_GENES = 23, 9
EMPTY_CELLS = [4, 5, 22]


@pytest.fixture(scope="module")
def counts_data():
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(1.0, 1.5, (N_CELLS, N_GENES))) * (rng.random((N_CELLS, N_GENES)) < 0.6)
    counts[0, 0] = 1
    counts[1] = rng.integers(1, 9, N_GENES)  # a full row
    counts[EMPTY_CELLS] = 0
    adata = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)))
    with pytest.warns(UserWarning, match="3 of 23 cells"):
        registry = setup_anndata(adata)
    return counts.astype(np.float32), CellData(adata, registry)


FIELDS = (
    "nz_row",
    "nz_col",
    "nz_val",
    "nz_row_ptr",
    "nz_log_factorial",
    "library",
    "batch_index",
    "label_index",
    "categorical_covariates",
    "continuous_covariates",
    "cell_index",
    "counts",
)


def _assert_consistent(mb, counts: np.ndarray) -> None:
    """The minibatch's sparse and dense views agree with each other and with the source rows."""
    rows = counts[mb.cell_index.numpy()]
    np.testing.assert_array_equal(mb.counts.numpy(), rows)
    np.testing.assert_array_equal(mb.library.numpy(), rows.sum(1))
    assert mb.nz_row_ptr.dtype == torch.int64 and mb.nz_row_ptr.shape == (mb.size + 1,)
    assert mb.nz_row_ptr[0] == 0 and mb.nz_row_ptr[-1] == mb.nz_val.numel()
    assert torch.equal(mb.nz_row_ptr.diff(), torch.bincount(mb.nz_row, minlength=mb.size))
    assert torch.all(mb.nz_row.diff() >= 0)  # sorted by row
    assert torch.all(mb.nz_val > 0)
    torch.testing.assert_close(mb.nz_log_factorial, torch.lgamma(mb.nz_val + 1.0))


def _assert_same_batches(batches, others) -> None:
    assert len(batches) == len(others)
    for mb, other in zip(batches, others):
        for name in FIELDS:
            assert torch.equal(getattr(mb, name), getattr(other, name)), name
        assert mb.n_genes == other.n_genes == N_GENES


@pytest.mark.parametrize("drop_last", [False, True])
def test_iterate_reproduces_the_rows_in_order(counts_data, drop_last):
    counts, data = counts_data
    batches = list(data.iterate(np.arange(N_CELLS), 5, shuffle=True, generator=torch.Generator().manual_seed(3)))
    batches = batches[:-1] if drop_last else batches
    dropped = list(
        data.iterate(
            np.arange(N_CELLS), 5, shuffle=True, generator=torch.Generator().manual_seed(3), drop_last=drop_last
        )
    )
    _assert_same_batches(dropped, batches)
    assert [mb.size for mb in batches] == ([5] * 4 if drop_last else [5, 5, 5, 5, 3])
    order = torch.cat([mb.cell_index for mb in batches]).numpy()
    if not drop_last:
        assert sorted(order) == list(range(N_CELLS))
    assert not np.array_equal(order, np.arange(len(order)))
    np.testing.assert_array_equal(torch.cat([mb.counts for mb in batches]).numpy(), counts[order])
    for mb in batches:
        _assert_consistent(mb, counts)


@pytest.mark.parametrize("entries", [1, 2 * 5 * N_GENES, 3 * 5 * N_GENES + 1])
def test_small_gather_chunks_give_the_same_batches(counts_data, monkeypatch, entries):
    counts, data = counts_data
    cells = np.array([7, 22, 1, 4, 19, 0, 13, 5, 2, 21, 8, 17, 3, 9, 11, 5, 16])  # a subset, with a repeat

    def batches():
        return list(data.iterate(cells, 5, shuffle=True, generator=torch.Generator().manual_seed(8)))

    default = batches()
    assert loader._GATHER_ENTRIES >= len(cells) * N_GENES  # one chunk by default
    monkeypatch.setattr(loader, "_GATHER_ENTRIES", entries)
    _assert_same_batches(batches(), default)
    for mb in default:
        _assert_consistent(mb, counts)


def test_native_and_torch_gather_agree(counts_data, monkeypatch):
    counts, data = counts_data
    cells = torch.tensor([22, 3, 1, 4, 4, 0, 18, 5])
    native = data.gather(cells)
    monkeypatch.setattr(loader._native, "library", lambda: None)
    fallback = data.gather(cells)
    _assert_same_batches([native], [fallback])
    _assert_consistent(native, counts)


def test_select_rows_equals_gathering_the_rows(counts_data):
    counts, data = counts_data
    cells = torch.tensor([9, 4, 1, 22, 0, 5, 13, 2, 7])
    block = data.gather(cells)
    row_ptr = block.nz_row_ptr.tolist()
    for begin, end in [(0, 9), (0, 3), (3, 6), (1, 2), (6, 9), (4, 4), (3, 4)]:
        for ptr in (None, row_ptr):
            part = block.select_rows(begin, end, ptr)
            _assert_same_batches([part], [data.gather(cells[begin:end])])
            _assert_consistent(part, counts)
            assert part.counts.shape == (end - begin, N_GENES)


@pytest.mark.needs_native
def test_iterated_batches_feed_the_native_likelihood(counts_data):
    """The loader's CSR row pointer is what the native kernel reads: right values, and the same as
    letting the likelihood sort the nonzeros and build the pointer itself."""
    _, data = counts_data
    torch.manual_seed(0)
    for mb in data.iterate(np.arange(N_CELLS), 6, shuffle=True, generator=torch.Generator().manual_seed(1)):
        logits = torch.randn(mb.size, N_GENES)
        log_library = torch.log1p(mb.library)[:, None]
        log_theta = torch.randn(1, N_GENES)
        zi = torch.randn(mb.size, N_GENES)
        nz = (mb.nz_row, mb.nz_col, mb.nz_val)
        out = D.softmax_count_log_likelihood("zinb", logits, log_library, log_theta, zi, *nz, nz_row_ptr=mb.nz_row_ptr)
        ref = _reference("zinb", logits, log_library, log_theta, zi, mb.counts)
        _assert_values_close(out, ref)
        rebuilt = D.softmax_count_log_likelihood("zinb", logits, log_library, log_theta, zi, *nz)
        assert torch.equal(out, rebuilt)
