"""Tests for sclatent.distributions: count log-likelihoods, the sparse and fused training paths, sampling.

References: scipy.stats (float64), a direct ZINB formula, torch/pyro distributions, and mpmath at 50
digits where float64 references themselves lose precision (huge theta, mu ~ 0).
"""

from __future__ import annotations

import itertools

import mpmath
import numpy as np
import pyro.distributions as pyro_dist
import pytest
import torch
import torch.nn.functional as F
from scipy import special, stats

from sclatent import distributions as D

LIKELIHOODS = ("zinb", "nb", "poisson")
EPS64 = np.finfo(np.float64).eps
EPS32 = np.finfo(np.float32).eps


def t64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


# ----------------------------------------------------------------------------- references


def scipy_nb(x, mu, theta):
    return stats.nbinom.logpmf(x, n=theta, p=theta / (theta + mu))


def scipy_zinb_direct(x, mu, theta, zi_logits):
    """log(pi * [x == 0] + (1 - pi) * NB(x)), literally."""
    pi = special.expit(zi_logits)
    return np.log(pi * (x == 0) + (1.0 - pi) * stats.nbinom.pmf(x, n=theta, p=theta / (theta + mu)))


def _mp_log_nb(x, mu, theta):
    """log NB(x | mu, theta) as an mpmath number (call inside workdps)."""
    x, mu, theta = mpmath.mpf(x), mpmath.mpf(mu), mpmath.mpf(theta)
    return (
        mpmath.loggamma(x + theta)
        - mpmath.loggamma(theta)
        - mpmath.loggamma(x + 1)
        + theta * mpmath.log(theta / (theta + mu))
        + x * mpmath.log(mu / (theta + mu))
    )


def mp_nb(x: float, mu: float, theta: float) -> float:
    """log NB(x | mu, theta) at 50 significant digits."""
    with mpmath.workdps(50):
        return float(_mp_log_nb(x, mu, theta))


def mp_zinb(x: float, mu: float, theta: float, zi: float) -> float:
    with mpmath.workdps(50):
        pi = 1 / (1 + mpmath.exp(-mpmath.mpf(zi)))
        return float(mpmath.log(pi * (x == 0) + (1 - pi) * mpmath.exp(_mp_log_nb(x, mu, theta))))


def mp_poisson(x: float, mu: float) -> float:
    with mpmath.workdps(50):
        x, mu = mpmath.mpf(x), mpmath.mpf(mu)
        return float(x * mpmath.log(mu) - mu - mpmath.loggamma(x + 1))


@pytest.fixture(scope="module")
def random_params():
    """Several hundred (x, mu, theta, zi_logits) in float64 over a wide but 'ordinary' range."""
    rng = np.random.default_rng(20240611)
    n = 600
    mu = np.exp(rng.uniform(np.log(1e-3), np.log(1e3), n))
    theta = np.exp(rng.uniform(np.log(1e-2), np.log(1e3), n))
    x = rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float64)
    x[: n // 4] = 0.0  # plenty of zeros, as in scRNA-seq
    x[n // 4 : n // 3] = rng.integers(1, 60, n // 3 - n // 4)  # some counts far from the mean
    zi = rng.normal(0.0, 2.5, n)
    return x, mu, theta, zi


# ----------------------------------------------------------------------------- against scipy / torch / pyro


def test_log_nb_matches_scipy(random_params):
    x, mu, theta, _ = random_params
    ours = D.log_nb(t64(x), t64(mu), t64(theta)).numpy()
    np.testing.assert_allclose(ours, scipy_nb(x, mu, theta), rtol=1e-9, atol=1e-10)
    assert np.any(x == 0) and np.any(x > 0)


def test_log_poisson_matches_scipy(random_params):
    x, mu, _, _ = random_params
    ours = D.log_poisson(t64(x), t64(mu)).numpy()
    np.testing.assert_allclose(ours, stats.poisson.logpmf(x, mu), rtol=1e-10, atol=1e-12)


def test_log_zinb_matches_direct_formula(random_params):
    x, mu, theta, zi = random_params
    ours = D.log_zinb(t64(x), t64(mu), t64(theta), t64(zi)).numpy()
    np.testing.assert_allclose(ours, scipy_zinb_direct(x, mu, theta, zi), rtol=1e-9, atol=1e-10)


def test_log_prob_dispatch_equals_named_functions(random_params):
    x, mu, theta, zi = map(t64, random_params)
    torch.testing.assert_close(D.log_prob("nb", x, mu, theta), D.log_nb(x, mu, theta), rtol=0, atol=0)
    torch.testing.assert_close(D.log_prob("zinb", x, mu, theta, zi), D.log_zinb(x, mu, theta, zi), rtol=0, atol=0)
    torch.testing.assert_close(D.log_prob("poisson", x, mu), D.log_poisson(x, mu), rtol=0, atol=0)


def test_against_torch_and_pyro_distributions(random_params):
    x, mu, theta, zi = map(t64, random_params)
    logits = torch.log(mu / theta)  # torch's NB has mean total_count * exp(logits)
    nb_ref = torch.distributions.NegativeBinomial(total_count=theta, logits=logits).log_prob(x)
    torch.testing.assert_close(D.log_nb(x, mu, theta), nb_ref, rtol=1e-8, atol=1e-8)
    zinb_ref = pyro_dist.ZeroInflatedNegativeBinomial(theta, logits=logits, gate_logits=zi).log_prob(x)
    torch.testing.assert_close(D.log_zinb(x, mu, theta, zi), zinb_ref, rtol=1e-8, atol=1e-8)
    pois_ref = torch.distributions.Poisson(mu).log_prob(x)
    torch.testing.assert_close(D.log_poisson(x, mu), pois_ref, rtol=1e-10, atol=1e-10)


def test_log_prob_broadcasts_gene_wise_parameters():
    rng = np.random.default_rng(1)
    x = t64(rng.poisson(2.0, (5, 7)))
    mu = t64(rng.uniform(0.1, 5, (5, 7)))
    theta_g = t64(rng.uniform(0.5, 5, 7))
    zi = t64(rng.normal(size=(5, 7)))
    full = D.log_zinb(x, mu, theta_g.expand(5, 7).clone(), zi)
    torch.testing.assert_close(D.log_zinb(x, mu, theta_g, zi), full)
    torch.testing.assert_close(D.log_zinb(x, mu, theta_g[None], zi), full)


# ----------------------------------------------------------------------------- extreme values

THETAS = (1e-6, 1e-2, 1.0, 1e3, 1e6, 1e8)
MUS = (1e-10, 1e-3, 1.0, 50.0, 1e4)
XS = (0.0, 1.0, 7.0, 1e4, 1e5)
ZIS = (-30.0, 0.0, 30.0)


def _grid(*axes):
    cols = np.array(list(itertools.product(*axes)), dtype=np.float64).T
    return tuple(cols)


def _lgamma_rounding(x, theta):
    """Float64 rounding bound of lgamma(x + theta) - lgamma(theta) - lgamma(x + 1) (a few ulps of each)."""
    return 8 * EPS64 * (np.abs(special.gammaln(x + theta)) + np.abs(special.gammaln(theta)) + special.gammaln(x + 1))


def test_extreme_nb_against_mpmath():
    """The exact (50-digit) reference everywhere; float64 can be no better than its lgamma rounding."""
    x, mu, theta = _grid(XS, MUS, THETAS)
    ours = D.log_nb(t64(x), t64(mu), t64(theta)).numpy()
    ref = np.array([mp_nb(*args) for args in zip(x, mu, theta)])
    assert np.isfinite(ref).all()
    assert not np.isnan(ours).any()
    assert np.isfinite(ours).all()
    tol = 1e-10 * np.abs(ref) + _lgamma_rounding(x, theta) + 1e-12
    bad = np.abs(ours - ref) > tol
    assert not bad.any(), list(zip(x[bad], mu[bad], theta[bad], ours[bad], ref[bad]))


def test_extreme_nb_against_scipy_where_scipy_is_reliable():
    """scipy computes 1 - p from p = theta / (theta + mu): reliable only when neither p nor 1 - p is tiny."""
    x, mu, theta = _grid(XS, MUS, THETAS)
    p = theta / (theta + mu)
    reliable = (p > 1e-3) & (p < 1 - 1e-3) & (theta <= 1e3)
    assert reliable.sum() > 20
    ours = D.log_nb(t64(x), t64(mu), t64(theta)).numpy()
    np.testing.assert_allclose(ours[reliable], scipy_nb(x, mu, theta)[reliable], rtol=1e-8, atol=1e-9)


def test_mu_tiny_values():
    theta = t64([1e-6, 1.0, 1e8])
    mu = t64([1e-10, 1e-10, 1e-10])
    # x = 0: probability ~ 1 (log ~ -theta * mu / theta = -mu)
    zero = D.log_nb(torch.zeros(3, dtype=torch.float64), mu, theta)
    assert torch.all(zero <= 0) and torch.all(zero > -1e-9)
    # x > 0: very negative but finite (not NaN, not -inf)
    for x in (1.0, 1e4, 1e5):
        xs = torch.full((3,), x, dtype=torch.float64)
        for value in (
            D.log_nb(xs, mu, theta),
            D.log_zinb(xs, mu, theta, t64([0.0, 30.0, -30.0])),
            D.log_poisson(xs, mu),
        ):
            assert torch.isfinite(value).all(), (x, value)
            assert torch.all(value < -10)


@pytest.mark.parametrize("theta", [1e6, 1e8])
def test_huge_theta_tends_to_poisson(theta):
    """log NB - log Poisson = ((x - mu)^2 - x) / (2 theta) + O(theta^-2); float64 lgamma error ~ ulp(lgamma(theta))."""
    x, mu = _grid((0.0, 1.0, 3.0, 10.0, 40.0), (1e-3, 0.5, 5.0, 30.0))
    nb = D.log_nb(t64(x), t64(mu), torch.full(x.shape, theta, dtype=torch.float64)).numpy()
    pois = stats.poisson.logpmf(x, mu)
    first_order = ((x - mu) ** 2 - x) / (2 * theta)
    rounding = _lgamma_rounding(x, theta)
    np.testing.assert_array_less(np.abs(nb - pois - first_order), rounding + 10 * (x + mu + 1) ** 3 / theta**2)


def test_extreme_zinb_against_mpmath():
    x, mu, theta, zi = _grid((0.0, 1.0, 1e4), (1e-10, 1.0, 1e4), (1e-6, 1.0, 1e8), ZIS)
    ours = D.log_zinb(t64(x), t64(mu), t64(theta), t64(zi)).numpy()
    ref = np.array([mp_zinb(*args) for args in zip(x, mu, theta, zi)])
    assert np.isfinite(ours).all()
    # torch's softplus returns its input above threshold=20, an absolute error up to exp(-20) ~ 2e-9
    tol = 1e-10 * np.abs(ref) + _lgamma_rounding(x, theta) + 2 * np.exp(-20.0)
    bad = np.abs(ours - ref) > tol
    assert not bad.any(), list(zip(x[bad], mu[bad], theta[bad], zi[bad], ours[bad], ref[bad]))


def test_extreme_poisson_against_mpmath_and_scipy():
    x, mu = _grid(XS, MUS)
    ours = D.log_poisson(t64(x), t64(mu)).numpy()
    ref = np.array([mp_poisson(*args) for args in zip(x, mu)])
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours, stats.poisson.logpmf(x, mu), rtol=1e-10, atol=1e-12)


def test_zero_inflation_logits_limits():
    """zi = +30: an excess zero is (almost) certain; zi = -30: ZINB = NB up to exp(-30)."""
    x = t64([0.0, 0.0, 3.0, 3.0])
    mu, theta = t64([2.0] * 4), t64([1.5] * 4)
    plus = D.log_zinb(x, mu, theta, torch.full((4,), 30.0, dtype=torch.float64))
    minus = D.log_zinb(x, mu, theta, torch.full((4,), -30.0, dtype=torch.float64))
    nb = D.log_nb(x, mu, theta)
    assert abs(plus[0].item()) < 1e-12  # log(pi + ...) with pi = 1 - 9e-14
    torch.testing.assert_close(plus[2], nb[2] - F.softplus(torch.tensor(30.0, dtype=torch.float64)))
    torch.testing.assert_close(minus, nb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_float32_close_to_float64(likelihood):
    """Float32 inputs: results finite and within float32 arithmetic error of float64 on the same inputs.

    The float64 reference is evaluated on the float32-rounded inputs, so the difference is arithmetic
    rounding only. Each term of log p (lgamma part, theta * log1p(mu / theta), x * log(mu / (theta + mu)),
    softplus(zi), x * log(mu), lgamma(x + 1)) is rounded to float32 with relative error a few eps32, and
    the sum can cancel, so the error is bounded by c * eps32 * (sum of |terms|); we take c = 4
    (the observed worst case on this grid is about 0.5).
    """
    x, mu, theta, zi = _grid(XS, MUS, THETAS, ZIS)
    x32, mu32, theta32, zi32 = (torch.tensor(a, dtype=torch.float32) for a in (x, mu, theta, zi))
    x64, mu64, theta64, zi64 = (a.double() for a in (x32, mu32, theta32, zi32))
    kwargs32 = {"theta": theta32, "zi_logits": zi32 if likelihood == "zinb" else None}
    kwargs64 = {"theta": theta64, "zi_logits": zi64 if likelihood == "zinb" else None}
    if likelihood == "poisson":
        kwargs32, kwargs64 = {}, {}
    out32 = D.log_prob(likelihood, x32, mu32, **kwargs32)
    out64 = D.log_prob(likelihood, x64, mu64, **kwargs64)
    assert out32.dtype == torch.float32
    assert torch.isfinite(out32).all()
    xn, mun, thn, zin = (a.numpy() for a in (x64, mu64, theta64, zi64))
    scale = special.gammaln(xn + 1) + xn * np.abs(np.log(mun)) + mun + np.abs(zin) + 1.0
    if likelihood != "poisson":
        scale += (
            np.abs(special.gammaln(xn + thn) - special.gammaln(thn))
            + thn * np.log1p(mun / thn)
            + xn * np.abs(np.log(thn + mun))
        )
    err = np.abs(out32.double().numpy() - out64.numpy())
    bad = err > 4 * EPS32 * scale
    assert not bad.any(), list(zip(xn[bad], mun[bad], thn[bad], zin[bad], err[bad]))


# ----------------------------------------------------------------------------- gradients at extremes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_log_prob_gradients_finite_at_extremes(likelihood, dtype):
    x, mu, theta, zi = _grid(XS, MUS, THETAS, ZIS)
    mu_t = torch.tensor(mu, dtype=dtype, requires_grad=True)
    theta_t = torch.tensor(theta, dtype=dtype, requires_grad=True)
    zi_t = torch.tensor(zi, dtype=dtype, requires_grad=True)
    x_t = torch.tensor(x, dtype=dtype)
    if likelihood == "poisson":
        out = D.log_prob(likelihood, x_t, mu_t)
        leaves = [mu_t]
    elif likelihood == "nb":
        out = D.log_prob(likelihood, x_t, mu_t, theta_t)
        leaves = [mu_t, theta_t]
    else:
        out = D.log_prob(likelihood, x_t, mu_t, theta_t, zi_t)
        leaves = [mu_t, theta_t, zi_t]
    grads = torch.autograd.grad(out.sum(), leaves)
    for g in grads:
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_log_prob_gradient_at_mu_exactly_zero(likelihood):
    """mu = 0 is a documented valid mean (mu >= 0): log p(0 | mu = 0) = 0 with a finite gradient.

    d/dmu log NB(0 | mu, theta) = -theta / (theta + mu) = -1 at mu = 0; Poisson: -1; ZINB: -(1 - pi).
    """
    mu = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([2.0], dtype=torch.float64)
    zi = torch.tensor([0.0], dtype=torch.float64)
    x = torch.zeros(1, dtype=torch.float64)
    args = {"poisson": (), "nb": (theta,), "zinb": (theta, zi)}[likelihood]
    value = D.log_prob(likelihood, x, mu, *args)
    assert value.item() == 0.0
    (grad,) = torch.autograd.grad(value.sum(), mu)
    expected = -0.5 if likelihood == "zinb" else -1.0
    torch.testing.assert_close(grad, torch.tensor([expected], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_softmax_path_gradients_finite_at_extremes(likelihood, dtype):
    B = 6
    logits = torch.tensor([[-50.0, 0.0, 50.0, 3.0, -3.0]] * 3 + [[0.0] * 5] * 3, dtype=dtype, requires_grad=True)
    log_library = torch.tensor(np.log([[1.0], [1e6], [10.0], [1e-3], [1e5], [2.0]]), dtype=dtype, requires_grad=True)
    log_theta = torch.tensor(
        np.log([[1e-6, 1e8, 1.0, 1e-6, 1e8]] * 3 + [[1e8, 1e-6, 1e3, 1e-2, 1.0]] * 3), dtype=dtype, requires_grad=True
    )
    zi = torch.tensor([[30.0, -30.0, 0.0, 30.0, -30.0]] * B, dtype=dtype, requires_grad=True)
    x = torch.tensor([[0, 1e5, 3, 0, 1], [2, 0, 1e4, 1, 0], [0, 0, 0, 0, 7]] * 2, dtype=dtype)
    r, c = x.nonzero(as_tuple=True)
    lt = log_theta if likelihood != "poisson" else None
    z = zi if likelihood == "zinb" else None
    out = D.softmax_count_log_likelihood(likelihood, logits, log_library, lt, z, r, c, x[r, c])
    assert torch.isfinite(out).all()
    leaves = [t for t in (logits, log_library, lt, z) if t is not None]
    for g in torch.autograd.grad(out.sum(), leaves):
        assert torch.isfinite(g).all()
    # and the reference sparse path agrees on finiteness
    theta = torch.exp(log_theta) if likelihood != "poisson" else None
    ref = D.count_log_likelihood(likelihood, torch.log_softmax(logits, -1) + log_library, theta, z, r, c, x[r, c])
    assert torch.isfinite(ref).all()
    for g in torch.autograd.grad(ref.sum(), leaves):
        assert torch.isfinite(g).all()


# ----------------------------------------------------------------------------- sparse per-cell path


def _sparse_batch(rng, B, G, dtype=torch.float64):
    x = rng.negative_binomial(1.0, 0.4, (B, G)).astype(np.float64)
    x[rng.random((B, G)) < 0.5] = 0.0
    x[0] = 0.0  # an empty cell
    x = torch.tensor(x, dtype=dtype)
    r, c = x.nonzero(as_tuple=True)
    return x, r, c, x[r, c]


@pytest.mark.parametrize("theta_shape", ["G", "1G", "BG"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_count_log_likelihood_equals_dense(likelihood, theta_shape):
    rng = np.random.default_rng(7)
    B, G = 9, 13
    x, r, c, v = _sparse_batch(rng, B, G)
    assert 0 < v.numel() < B * G
    log_mu = t64(rng.normal(0.0, 2.0, (B, G)))
    theta_bg = t64(np.exp(rng.normal(0.0, 2.0, (B, G))))
    theta = {"G": theta_bg[0], "1G": theta_bg[:1], "BG": theta_bg}[theta_shape]
    zi = t64(rng.normal(0.0, 2.0, (B, G))) if likelihood == "zinb" else None
    th = None if likelihood == "poisson" else theta
    sparse = D.count_log_likelihood(likelihood, log_mu, th, zi, r, c, v)
    dense = D.log_prob(likelihood, x, log_mu.exp(), th, zi).sum(-1)
    assert sparse.shape == (B,)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_count_log_likelihood_without_nonzeros(likelihood):
    rng = np.random.default_rng(3)
    B, G = 4, 6
    log_mu = t64(rng.normal(size=(B, G)))
    theta = t64(np.exp(rng.normal(size=G))) if likelihood != "poisson" else None
    zi = t64(rng.normal(size=(B, G))) if likelihood == "zinb" else None
    empty_i, empty_v = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64)
    out = D.count_log_likelihood(likelihood, log_mu, theta, zi, empty_i, empty_i, empty_v)
    dense = D.log_prob(likelihood, torch.zeros(B, G, dtype=torch.float64), log_mu.exp(), theta, zi).sum(-1)
    torch.testing.assert_close(out, dense, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- fused softmax path


def _softmax_inputs(likelihood, theta_shape, B=7, G=11, seed=0, with_nonzeros=True):
    rng = np.random.default_rng(seed)
    _, r, c, v = _sparse_batch(rng, B, G)
    if not with_nonzeros:
        r, c, v = r[:0], c[:0], v[:0]
    logits = t64(rng.normal(0.0, 1.5, (B, G))).requires_grad_()
    log_library = t64(np.log(rng.uniform(5, 500, (B, 1)))).requires_grad_()
    shape = (1, G) if theta_shape == "1G" else (B, G)
    log_theta = t64(rng.normal(0.0, 1.5, shape)).requires_grad_() if likelihood != "poisson" else None
    zi = t64(rng.normal(0.0, 2.0, (B, G))).requires_grad_() if likelihood == "zinb" else None
    return logits, log_library, log_theta, zi, r, c, v


@pytest.mark.parametrize("with_nonzeros", [True, False])
@pytest.mark.parametrize("theta_shape", ["1G", "BG"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_softmax_path_matches_count_log_likelihood(likelihood, theta_shape, with_nonzeros):
    logits, log_library, log_theta, zi, r, c, v = _softmax_inputs(likelihood, theta_shape, with_nonzeros=with_nonzeros)
    leaves = [t for t in (logits, log_library, log_theta, zi) if t is not None]
    fused = D.softmax_count_log_likelihood(likelihood, logits, log_library, log_theta, zi, r, c, v)
    theta = torch.exp(log_theta) if log_theta is not None else None
    ref = D.count_log_likelihood(likelihood, torch.log_softmax(logits, -1) + log_library, theta, zi, r, c, v)
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-10)
    # a non-uniform upstream gradient, so per-cell weighting is checked too
    weights = torch.linspace(-1.0, 2.0, fused.numel(), dtype=torch.float64)
    g_fused = torch.autograd.grad((fused * weights).sum(), leaves)
    g_ref = torch.autograd.grad((ref * weights).sum(), leaves)
    for a, b, leaf in zip(g_fused, g_ref, leaves, strict=True):
        assert a.shape == leaf.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_softmax_path_gradient_only_for_some_inputs():
    """log_library and log_theta not requiring grad (e.g. a fixed library size) still works."""
    logits, log_library, log_theta, zi, r, c, v = _softmax_inputs("zinb", "1G")
    log_library, log_theta = log_library.detach(), log_theta.detach()
    fused = D.softmax_count_log_likelihood("zinb", logits, log_library, log_theta, zi, r, c, v)
    ref = D.count_log_likelihood("zinb", torch.log_softmax(logits, -1) + log_library, log_theta.exp(), zi, r, c, v)
    for a, b in zip(torch.autograd.grad(fused.sum(), [logits, zi]), torch.autograd.grad(ref.sum(), [logits, zi])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_softmax_path_backward_twice_with_retain_graph(likelihood):
    """An ordinary autograd.Function supports several backward passes over a retained graph."""
    logits, log_library, log_theta, zi, r, c, v = _softmax_inputs(likelihood, "1G")
    out = D.softmax_count_log_likelihood(likelihood, logits, log_library, log_theta, zi, r, c, v).sum()
    (first,) = torch.autograd.grad(out, logits, retain_graph=True)
    (second,) = torch.autograd.grad(out, logits)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_softmax_path_gradcheck(likelihood):
    B, G = 3, 4
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(B, G, dtype=torch.float64, generator=gen, requires_grad=True)
    log_library = (torch.rand(B, 1, dtype=torch.float64, generator=gen) * 3).requires_grad_()
    log_theta = torch.randn(1, G, dtype=torch.float64, generator=gen, requires_grad=True)
    zi = torch.randn(B, G, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.tensor([[0, 1, 0, 3], [2, 0, 0, 0], [0, 0, 5, 1]], dtype=torch.float64)
    r, c = x.nonzero(as_tuple=True)
    v = x[r, c]
    inputs = [logits, log_library]
    if likelihood != "poisson":
        inputs.append(log_theta)
    if likelihood == "zinb":
        inputs.append(zi)

    def fn(*args):
        lt = args[2] if likelihood != "poisson" else None
        z = args[3] if likelihood == "zinb" else None
        return D.softmax_count_log_likelihood(likelihood, args[0], args[1], lt, z, r, c, v)

    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_count_log_likelihood_gradcheck(likelihood):
    """The reference sparse path is plain autograd; check it against finite differences too."""
    gen = torch.Generator().manual_seed(5)
    log_mu = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    theta = (torch.rand(1, 4, dtype=torch.float64, generator=gen) + 0.3).requires_grad_()
    zi = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.tensor([[0, 1, 0, 3], [2, 0, 0, 0], [0, 0, 5, 1]], dtype=torch.float64)
    r, c = x.nonzero(as_tuple=True)
    th = theta if likelihood != "poisson" else None
    z = zi if likelihood == "zinb" else None
    inputs = tuple(t for t in (log_mu, th, z) if t is not None)

    def fn(*args):
        it = iter(args)
        a = next(it)
        b = next(it) if th is not None else None
        cc = next(it) if z is not None else None
        return D.count_log_likelihood(likelihood, a, b, cc, r, c, x[r, c])

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- sampling

N_DRAWS = 200_000


def _draw(likelihood, mu_values, theta_values=None, zi_values=None, seed=0):
    torch.manual_seed(seed)  # the gamma draw uses the global RNG
    gen = torch.Generator().manual_seed(seed)
    k = len(mu_values)
    mu = torch.tensor(mu_values, dtype=torch.float64).expand(N_DRAWS, k)
    theta = torch.tensor(theta_values, dtype=torch.float64) if theta_values is not None else None
    zi = torch.tensor(zi_values, dtype=torch.float64).expand(N_DRAWS, k) if zi_values is not None else None
    out = D.sample(likelihood, mu, theta, zi, generator=gen)
    assert out.shape == (N_DRAWS, k)
    assert out.dtype.is_floating_point
    assert torch.all(out >= 0)
    assert torch.equal(out, torch.round(out))
    return out.numpy()


def _assert_mean(draws, expected, z=5.0):
    mean = draws.mean(0)
    se = draws.std(0) / np.sqrt(draws.shape[0])
    assert np.all(np.abs(mean - expected) < z * se + 1e-12), (mean, expected, se)


def _assert_var(draws, expected, z=5.0):
    centred = (draws - draws.mean(0)) ** 2
    var = centred.mean(0)
    se = centred.std(0) / np.sqrt(draws.shape[0])
    assert np.all(np.abs(var - expected) < z * se), (var, expected, se)


def test_sample_nb_moments():
    mu = np.array([0.5, 3.0, 20.0])
    theta = np.array([0.7, 2.0, 10.0])
    draws = _draw("nb", mu, theta)
    _assert_mean(draws, mu)
    _assert_var(draws, mu + mu**2 / theta)
    # the zero fraction matches NB(0) = (theta / (theta + mu))^theta
    p0 = (theta / (theta + mu)) ** theta
    frac0 = (draws == 0).mean(0)
    assert np.all(np.abs(frac0 - p0) < 5 * np.sqrt(p0 * (1 - p0) / N_DRAWS))


def test_sample_zinb_moments_and_zero_fraction():
    mu = np.array([0.5, 3.0, 20.0])
    theta = np.array([0.7, 2.0, 10.0])
    zi = np.array([-1.0, 0.0, 1.5])
    pi = special.expit(zi)
    draws = _draw("zinb", mu, theta, zi)
    _assert_mean(draws, (1 - pi) * mu)
    p0 = pi + (1 - pi) * (theta / (theta + mu)) ** theta
    frac0 = (draws == 0).mean(0)
    assert np.all(np.abs(frac0 - p0) < 5 * np.sqrt(p0 * (1 - p0) / N_DRAWS))
    # variance of the mixture: (1 - pi) * (mu + mu^2 / theta) + pi * (1 - pi) * mu^2
    _assert_var(draws, (1 - pi) * (mu + mu**2 / theta) + pi * (1 - pi) * mu**2)


def test_sample_poisson_moments():
    mu = np.array([0.2, 4.0, 50.0])
    draws = _draw("poisson", mu)
    _assert_mean(draws, mu)
    _assert_var(draws, mu)


def test_sample_reproducible_with_seeds():
    mu = torch.full((1000,), 3.0)
    theta = torch.full((1000,), 2.0)
    zi = torch.zeros(1000)
    outs = []
    for _ in range(2):
        torch.manual_seed(1)
        outs.append(D.sample("zinb", mu, theta, zi, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(outs[0], outs[1])


def test_sample_zero_mean_gives_zero():
    mu = torch.zeros(50)
    for lik, args in (("poisson", ()), ("nb", (torch.ones(50),)), ("zinb", (torch.ones(50), torch.zeros(50)))):
        assert torch.equal(D.sample(lik, mu, *args), torch.zeros(50))


# ----------------------------------------------------------------------------- errors


def test_unknown_likelihood_raises_value_error():
    x = torch.ones(2, 3)
    idx = torch.zeros(0, dtype=torch.int64)
    with pytest.raises(ValueError, match="gene_likelihood"):
        D.log_prob("gaussian", x, x, x)
    with pytest.raises(ValueError, match="'zip'"):
        D.count_log_likelihood("zip", x, x, None, idx, idx, x[0, :0])
    with pytest.raises(ValueError, match="NB"):
        D.softmax_count_log_likelihood("NB", x, x[:, :1], x, None, idx, idx, x[0, :0])
    with pytest.raises(ValueError, match="negbin"):
        D.sample("negbin", x, x)
