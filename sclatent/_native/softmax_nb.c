/*
 * Fused softmax + (zero-inflated) negative binomial log-likelihood with its gradients, one pass
 * over a dense (B, G) minibatch. The training hot spot of every count model: in plain torch it is
 * ~40 elementwise kernels (each a full read and write of B x G floats) plus lgamma/digamma at the
 * nonzeros; here each row is read once, in cache, with vectorised exp/log (gcc maps them to
 * glibc's libmvec under -ffast-math).
 *
 * Per row b (cells are independent, so rows are split across OpenMP threads):
 *   e_g   = exp(h_g - max h)                 softmax numerator
 *   mu_g  = library_b * e_g / sum(e)         mean
 *   zero_g = log(pi + (1 - pi) NB(0))        (NB: log NB(0)), closed form, for every entry
 *   at x_g != 0 the zero term is replaced by the full log-probability (scalar, double precision;
 *   with a gene-wise theta, its lgamma/digamma terms come from a per-gene table built once per
 *   call: the whole call 1.2x faster on pbmc3k's counts, 1.8x on cellbench_5cl's, measured by
 *   benchmarks/probe_likelihood_kernel.py)
 *   out_b = sum_g term_g
 * and, when gradients are asked for, d out_b / d h (through the softmax), d / d log theta and
 * d / d zi_logits per entry, and d / d log library per row. The caller scales them by the
 * incoming gradient (autograd's backward) and reduces theta's gradient over cells if needed.
 *
 * Built and loaded at run time by sclatent/_native/__init__.py; the torch implementation in
 * sclatent/distributions.py is the reference it is tested against.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/*
 * Inline exp/log for the vectorised loops (Cephes' single-precision polynomials, ~1 ulp on the
 * ranges used here). Calls into libmvec force every live vector register to be spilled around
 * each call; inline polynomials keep the loop in registers, ~2x faster for this loop body.
 */
static inline int thread_index(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline float bits_to_float(int32_t i) {
    float f;
    memcpy(&f, &i, sizeof f);
    return f;
}

static inline int32_t float_to_bits(float f) {
    int32_t i;
    memcpy(&i, &f, sizeof i);
    return i;
}

/* e^x for x in [-87, 88] (callers clamp) */
static inline float fast_expf(float x) {
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r -= n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * bits_to_float(((int32_t)n + 127) << 23);
}

/* log(x) for normal positive x */
static inline float fast_logf(float x) {
    int32_t bits = float_to_bits(x);
    float e = (float)((bits >> 23) - 126);
    float m = bits_to_float((bits & 0x007fffff) | 0x3f000000); /* x = m * 2^e, m in [0.5, 1) */
    if (m < 0.707106781186547524f) {
        e -= 1.0f;
        m = m + m - 1.0f;
    } else {
        m = m - 1.0f;
    }
    const float z = m * m;
    float p = 7.0376836292e-2f;
    p = p * m - 1.1514610310e-1f;
    p = p * m + 1.1676998740e-1f;
    p = p * m - 1.2420140846e-1f;
    p = p * m + 1.4249322787e-1f;
    p = p * m - 1.6668057665e-1f;
    p = p * m + 2.0000714765e-1f;
    p = p * m - 2.4999993993e-1f;
    p = p * m + 3.3333331174e-1f;
    float y = p * m * z;
    y += e * -2.12194440e-4f;
    y -= 0.5f * z;
    return m + y + e * 0.693359375f;
}

/*
 * log(1 + r) for r >= 0. For r < 0.5 the series 2 atanh(s), s = r / (2 + r), which has no
 * cancellation (the textbook log(u) * r / (u - 1) correction does not survive -ffast-math: gcc
 * folds (1 + r) - 1 to r); above, log(1 + r) is accurate as is.
 */
static inline float fast_log1pf(float r) {
    const float s = r / (2.0f + r), s2 = s * s;
    float p = 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return r < 0.5f ? 2.0f * s * p : fast_logf(1.0f + r);
}

/*
 * r / (1 + r) - log(1 + r), the d log NB(0) / d log(theta) factor. Its two terms cancel to
 * -r^2 / 2 for small r (theta >> mu, common for near-Poisson genes), so there the series
 * sum_{k >= 2} (-1)^(k+1) (k - 1) / k r^k is used (relative error < 2e-7 for r < 0.1).
 */
static inline float ratio_minus_log1p(float r, float inv_1pr, float log1p_r) {
    float p = -7.0f / 8.0f;
    p = p * r + 6.0f / 7.0f;
    p = p * r - 5.0f / 6.0f;
    p = p * r + 4.0f / 5.0f;
    p = p * r - 3.0f / 4.0f;
    p = p * r + 2.0f / 3.0f;
    p = p * r - 0.5f;
    return r < 0.1f ? p * r * r : r * inv_1pr - log1p_r;
}

/* digamma for x > 0: recurrence up to x >= 6, then the asymptotic series (|error| < 1e-12) */
static double digamma_pos(double x) {
    double shift = 0.0;
    while (x < 6.0) {
        shift -= 1.0 / x;
        x += 1.0;
    }
    double f = 1.0 / (x * x);
    double tail = f * (-1.0 / 12 + f * (1.0 / 120 + f * (-1.0 / 252 + f * (1.0 / 240 + f * (-1.0 / 132)))));
    return shift + log(x) - 0.5 / x + tail;
}

static const double LOG_FACTORIAL[9] = {
    0.0, 0.0, 0.69314718055994531, 1.79175946922805500, 3.17805383034794562,
    4.78749174278204599, 6.57925121201010100, 8.52516136106541430, 10.60460290274525023,
};

/* lgamma(x + theta) - lgamma(theta) - lgamma(x + 1) and digamma(x + theta) - digamma(theta) */
static void nb_count_terms(double x, double theta, double *log_coefficient, double *digamma_difference) {
    if (x <= 8.0 && x == floor(x) && theta < 1e6) {
        /* small integer counts (most of them): finite sums instead of special functions */
        int n = (int)x;
        double product = 1.0, harmonic = 0.0;
        for (int i = 0; i < n; i++) {
            product *= theta + i;
            harmonic += 1.0 / (theta + i);
        }
        *log_coefficient = log(product) - LOG_FACTORIAL[n];
        *digamma_difference = harmonic;
    } else {
        *log_coefficient = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1.0);
        *digamma_difference = digamma_pos(x + theta) - digamma_pos(theta);
    }
}

/*
 * Per-gene count terms for a dispersion shared by every row (gene-wise theta): computed once per
 * call instead of once per nonzero entry. For gene g, with 18 doubles per gene:
 *   [n - 1]      lgamma(n + theta) - lgamma(theta) - lgamma(n + 1), n = 1..8 (finite sums)
 *   [8 + n - 1]  digamma(n + theta) - digamma(theta)
 *   [16], [17]   lgamma(theta), digamma(theta)
 * A gene whose theta is past the finite sums' range (>= 1e6) is left out; its entries take the
 * per-entry path (the check is on theta, not a NaN marker: -ffast-math assumes no NaNs).
 */
#define GENE_TERMS 18

static void gene_count_terms(double theta, double *terms) {
    if (!(theta < 1e6)) return;
    double log_product = 0.0, harmonic = 0.0;
    for (int n = 1; n <= 8; n++) {
        log_product += log(theta + (n - 1));
        harmonic += 1.0 / (theta + (n - 1));
        terms[n - 1] = log_product - LOG_FACTORIAL[n];
        terms[8 + n - 1] = harmonic;
    }
    terms[16] = lgamma(theta);
    terms[17] = digamma_pos(theta);
}

/*
 * lgamma(y) and digamma(y) for y >= 8 from their asymptotic series, sharing one log (|error| <
 * 1e-11 in both); the large-count entries' special functions.
 */
static inline void lgamma_digamma_large(double y, double *lgamma_y, double *digamma_y) {
    const double log_y = log(y), inv = 1.0 / y, inv2 = inv * inv;
    *lgamma_y = (y - 0.5) * log_y - y + 0.91893853320467274178 +
                inv * (1.0 / 12 + inv2 * (-1.0 / 360 + inv2 * (1.0 / 1260 + inv2 * (-1.0 / 1680))));
    *digamma_y = log_y - 0.5 * inv + inv2 * (-1.0 / 12 + inv2 * (1.0 / 120 + inv2 * (-1.0 / 252 + inv2 * (1.0 / 240))));
}

/* nb_count_terms from a gene's precomputed terms (gene_count_terms), for a gene-wise theta */
static inline void nb_count_terms_shared(double x, double theta, const double *terms, double *log_coefficient,
                                         double *digamma_difference) {
    if (theta < 1e6) { /* as gene_count_terms */
        if (x >= 1.0 && x <= 8.0 && x == floor(x)) {
            const int n = (int)x;
            *log_coefficient = terms[n - 1];
            *digamma_difference = terms[8 + n - 1];
            return;
        }
        if (x > 8.0) {
            double lgamma_total, digamma_total, lgamma_count, digamma_count;
            lgamma_digamma_large(x + theta, &lgamma_total, &digamma_total);
            lgamma_digamma_large(x + 1.0, &lgamma_count, &digamma_count);
            *log_coefficient = lgamma_total - terms[16] - lgamma_count;
            *digamma_difference = digamma_total - terms[17];
            return;
        }
    }
    nb_count_terms(x, theta, log_coefficient, digamma_difference);
}

/*
 * log p(x = 0) of every entry of a row into zero[], their sum returned. Also keeps log1p(mu/theta)
 * in l1p[] and, for the ZINB, 1 - pi in keep[] for the nonzero pass. With grad (then gh, glt and
 * gz are rows to fill) also the gradients w.r.t. log mu, log theta (and zi_logits). Inlined with a
 * literal grad, so gcc emits a branch-free, vectorised loop for each case. The flag is not gh !=
 * NULL: a pointer the compiler cannot prove non-NULL turned the gradient stores into masked
 * stores (vmaskmovps), microcoded on AMD Zen: a training call ran 1.2-1.3x slower for it on a
 * 2-core EPYC (benchmarks/probe_likelihood_kernel.py --against e599b34).
 */
static inline __attribute__((always_inline)) float zinb_zero_terms(int64_t G, const float *e, float scale,
                                                                   const float *th_row, const float *zb,
                                                                   float *zero, float *l1p, float *keep,
                                                                   float *gh, float *glt, float *gz, const int grad) {
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t g = 0; g < G; g++) {
        float mu = e[g] * scale, th = th_row[g];
        float ratio = mu / th, log1p_ratio = fast_log1pf(ratio);
        float nb0 = -th * log1p_ratio;
        /* pi and 1 - pi from one exp, each without cancellation: 1 - pi is log()'d at nonzeros */
        float t = fast_expf(fmaxf(-fabsf(zb[g]), -87.0f)), inv_1pt = 1.0f / (1.0f + t);
        float pi = zb[g] >= 0.0f ? inv_1pt : t * inv_1pt;
        float q = zb[g] >= 0.0f ? t * inv_1pt : inv_1pt;
        float w = fast_expf(fmaxf(nb0, -80.0f));
        float p0 = fmaxf(pi + q * w, FLT_MIN);
        float term = fast_logf(p0);
        zero[g] = term;
        l1p[g] = log1p_ratio;
        keep[g] = q;
        total += term;
        if (grad) {
            float inv = 1.0f / (1.0f + ratio), inv_p0 = 1.0f / p0, s = q * w * inv_p0;
            gh[g] = -mu * inv * s;
            glt[g] = th * ratio_minus_log1p(ratio, inv, log1p_ratio) * s;
            gz[g] = pi * q * (1.0f - w) * inv_p0;
        }
    }
    return total;
}

static inline __attribute__((always_inline)) float nb_zero_terms(int64_t G, const float *e, float scale,
                                                                 const float *th_row, float *zero, float *l1p,
                                                                 float *gh, float *glt, const int grad) {
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t g = 0; g < G; g++) {
        float mu = e[g] * scale, th = th_row[g];
        float ratio = mu / th, log1p_ratio = fast_log1pf(ratio);
        float term = -th * log1p_ratio;
        zero[g] = term;
        l1p[g] = log1p_ratio;
        total += term;
        if (grad) {
            float inv = 1.0f / (1.0f + ratio);
            gh[g] = -mu * inv;
            glt[g] = th * ratio_minus_log1p(ratio, inv, log1p_ratio);
        }
    }
    return total;
}

/*
 * h: (B, G) with row stride h_stride; zi: (B, G) with row stride zi_stride, NULL for the NB;
 * log_library: (B,); theta, log_theta: (B, G) with row stride theta_stride (0: shared by all rows);
 * row_ptr (B + 1,), cols, values (nnz,): the nonzero counts in CSR form; out: (B,);
 * work: (n_threads, 4, G) scratch, one row's intermediates per thread (they stay in L1/L2 cache).
 * grad_h, grad_zi: (B, G) with row stride grad_stride (they may interleave in one buffer, as h and
 * zi may); grad_log_theta: (B, G) contiguous; all three NULL for no gradients. grad_log_library:
 * (B,) or NULL. row_coefficients: (B,) double, each row's sum over its nonzeros of
 * lgamma(x + theta) - lgamma(theta) - lgamma(x + 1), when the caller knows it (rows that repeat one
 * cell under several latent samples share it); NULL to compute it here. Gradients need the
 * per-entry digamma terms, so it is only read without them.
 */
void softmax_nb_log_likelihood(int64_t B, int64_t G, const float *h, int64_t h_stride, const float *zi,
                               int64_t zi_stride, const float *log_library, const float *theta,
                               const float *log_theta, int64_t theta_stride, const int64_t *row_ptr,
                               const int64_t *cols, const float *values, const double *row_coefficients,
                               float *out, float *work, float *grad_h, float *grad_log_library,
                               float *grad_log_theta, float *grad_zi, int64_t grad_stride, int n_threads) {
    const int want_grad = grad_h != 0;
    const int known_coefficients = row_coefficients != 0 && !want_grad;
    /* a gene-wise theta: each gene's count terms once, not once per nonzero entry */
    double *gene_terms = 0;
    if (!known_coefficients && theta_stride == 0) gene_terms = (double *)malloc(sizeof(double) * GENE_TERMS * G);
#pragma omp parallel num_threads(n_threads)
    {
    if (gene_terms) {
#pragma omp for schedule(static)
        for (int64_t g = 0; g < G; g++) gene_count_terms((double)theta[g], gene_terms + g * GENE_TERMS);
    }
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; b++) {
        const float *hb = h + b * h_stride;
        const float *thb = theta + b * theta_stride, *ltb = log_theta + b * theta_stride;
        const float *zb = zi ? zi + b * zi_stride : 0;
        float *e = work + (int64_t)thread_index() * 4 * G, *zero = e + G, *l1p = e + 2 * G, *keep = e + 3 * G;
        float *gh = want_grad ? grad_h + b * grad_stride : 0;
        float *glt = want_grad ? grad_log_theta + b * G : 0;
        float *gz = (want_grad && zi) ? grad_zi + b * grad_stride : 0;

        float row_max = -FLT_MAX;
        for (int64_t g = 0; g < G; g++) row_max = hb[g] > row_max ? hb[g] : row_max;
        float sum = 0.0f;
        /* floor at e^-87: the smallest normal float; denormals are ~100x slower on x86 */
        for (int64_t g = 0; g < G; g++) {
            e[g] = fast_expf(fmaxf(hb[g] - row_max, -87.0f));
            sum += e[g];
        }
        const float log_normaliser = row_max + logf(sum);
        const float scale = expf(log_library[b]) / sum;

        float total = 0.0f;
        if (zb && want_grad) total = zinb_zero_terms(G, e, scale, thb, zb, zero, l1p, keep, gh, glt, gz, 1);
        else if (zb) total = zinb_zero_terms(G, e, scale, thb, zb, zero, l1p, keep, 0, 0, 0, 0);
        else if (want_grad) total = nb_zero_terms(G, e, scale, thb, zero, l1p, gh, glt, 1);
        else total = nb_zero_terms(G, e, scale, thb, zero, l1p, 0, 0, 0);

        /* nonzero counts: the full term replaces the zero term (float except the coefficient) */
        double correction = 0.0;
        const float log_mu_offset = log_library[b] - log_normaliser;
        for (int64_t k = row_ptr[b]; k < row_ptr[b + 1]; k++) {
            const int64_t g = cols[k];
            const float xv = values[k], th = thb[g], mu = e[g] * scale, log1p_ratio = l1p[g];
            double log_coefficient = 0.0, digamma_difference = 0.0;
            if (gene_terms)
                nb_count_terms_shared(xv, th, gene_terms + g * GENE_TERMS, &log_coefficient, &digamma_difference);
            else if (!known_coefficients)
                nb_count_terms(xv, th, &log_coefficient, &digamma_difference);
            float term = -th * log1p_ratio + xv * (hb[g] + log_mu_offset - ltb[g] - log1p_ratio);
            if (zb) term += logf(keep[g]); /* log(1 - pi) */
            correction += log_coefficient + (double)(term - zero[g]);
            if (want_grad) {
                const float inv_total_mean = 1.0f / (th + mu);
                gh[g] = xv - (th + xv) * mu * inv_total_mean;
                glt[g] = th * ((float)digamma_difference - log1p_ratio + (mu - xv) * inv_total_mean);
                if (zb) gz[g] = keep[g] - 1.0f; /* -pi */
            }
        }
        if (known_coefficients) correction += row_coefficients[b];
        out[b] = (float)((double)total + correction);

        if (want_grad) {
            /* d/dh_k = d/dlog mu_k - softmax_k * sum_g d/dlog mu_g */
            float row_sum = 0.0f;
            for (int64_t g = 0; g < G; g++) row_sum += gh[g];
            const float inv_sum = 1.0f / sum;
            for (int64_t g = 0; g < G; g++) gh[g] -= e[g] * inv_sum * row_sum;
            if (grad_log_library) grad_log_library[b] = row_sum;
        }
    }
    }
    free(gene_terms);
}
