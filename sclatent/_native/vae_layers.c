/*
 * The small layers of the count VAE's training step, forward and backward, for the fused ELBO of
 * sclatent/modules/fused_elbo.py: BatchNorm (training mode) -> ReLU -> dropout on a (B, H)
 * activation, and the Gaussian head (reparameterised sample and KL to N(0, I)). In torch each is
 * 5-10 elementwise kernels of ~16k entries, where dispatch, not arithmetic, is the cost; here each
 * is one pass. Single-threaded: a 128 x 128 activation takes a few microseconds.
 *
 * Row-major (B, H) throughout; the batch statistics are those of torch.nn.BatchNorm1d in training
 * mode (biased variance for the normalisation; the caller updates the running statistics).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/*
 * out = relu(gamma * xhat + beta) * mask with xhat = (a - mean) * rstd, row by row; writes xhat and
 * gate (d out / d (gamma * xhat + beta)) for the backward. mask NULL: no dropout.
 */
static inline void normalise_relu_rows(int64_t B, int64_t H, const float *a, const float *mean, const float *rstd,
                                       const float *gamma, const float *beta, const float *mask, float *out,
                                       float *xhat, float *gate) {
    for (int64_t b = 0; b < B; b++) {
        const float *row = a + b * H, *m = mask ? mask + b * H : 0;
        float *o = out + b * H, *xh = xhat + b * H, *gt = gate + b * H;
#pragma omp simd
        for (int64_t j = 0; j < H; j++) {
            const float x = (row[j] - mean[j]) * rstd[j];
            const float y = gamma[j] * x + beta[j];
            const float keep = m ? m[j] : 1.0f;
            const float g = y > 0.0f ? keep : 0.0f;
            xh[j] = x;
            gt[j] = g;
            o[j] = y * g;
        }
    }
}

/*
 * out = relu(gamma * xhat + beta) * mask, xhat = (a - mean) * rstd, over columns of a (B, H).
 * mask: (B, H) dropout scale (0 or 1 / (1 - p)) or NULL for none. Writes mean, var (biased) and
 * rstd (H,), xhat (B, H) and gate (B, H) = d out / d (gamma * xhat + beta), for the backward, and
 * moves running_mean and running_var towards the batch's mean and unbiased variance by momentum.
 */
void bn_relu_forward(int64_t B, int64_t H, const float *a, const float *gamma, const float *beta, float eps,
                     float momentum, float *running_mean, float *running_var, const float *mask, float *out,
                     float *xhat, float *gate, float *mean, float *var, float *rstd) {
    memset(mean, 0, (size_t)H * sizeof(float));
    memset(var, 0, (size_t)H * sizeof(float));
    for (int64_t b = 0; b < B; b++) {
        const float *row = a + b * H;
#pragma omp simd
        for (int64_t j = 0; j < H; j++) mean[j] += row[j];
    }
    const float inv_b = 1.0f / (float)B;
#pragma omp simd
    for (int64_t j = 0; j < H; j++) mean[j] *= inv_b;
    /* two passes (mean, then squared deviations): no cancellation for large activations */
    for (int64_t b = 0; b < B; b++) {
        const float *row = a + b * H;
#pragma omp simd
        for (int64_t j = 0; j < H; j++) {
            const float d = row[j] - mean[j];
            var[j] += d * d;
        }
    }
    const float unbiased = B > 1 ? (float)B / (float)(B - 1) : 1.0f;
#pragma omp simd
    for (int64_t j = 0; j < H; j++) {
        var[j] *= inv_b;
        rstd[j] = 1.0f / sqrtf(var[j] + eps);
        running_mean[j] += momentum * (mean[j] - running_mean[j]);
        running_var[j] += momentum * (var[j] * unbiased - running_var[j]);
    }
    normalise_relu_rows(B, H, a, mean, rstd, gamma, beta, mask, out, xhat, gate);
}

/*
 * The first pass of both BatchNorm backwards: dy = grad_out * gate into dy_out (B, H), and the
 * affine parameters' gradients grad_beta = sum_b dy, grad_gamma = sum_b dy xhat (H,) overwritten.
 */
static inline void affine_gradients(int64_t B, int64_t H, const float *grad_out, const float *xhat, const float *gate,
                                    float *dy_out, float *grad_gamma, float *grad_beta) {
    memset(grad_gamma, 0, (size_t)H * sizeof(float));
    memset(grad_beta, 0, (size_t)H * sizeof(float));
    for (int64_t b = 0; b < B; b++) {
        const float *go = grad_out + b * H, *xh = xhat + b * H, *gt = gate + b * H;
        float *dy_row = dy_out + b * H;
#pragma omp simd
        for (int64_t j = 0; j < H; j++) {
            const float dy = go[j] * gt[j];
            dy_row[j] = dy;
            grad_beta[j] += dy;
            grad_gamma[j] += dy * xh[j];
        }
    }
}

/*
 * Backward of bn_relu_forward: grad_a (B, H), grad_gamma and grad_beta (H,) overwritten.
 * With dy = grad_out * gate: d beta = sum_b dy, d gamma = sum_b dy xhat and
 * d a = gamma rstd (dy - d beta / B - xhat d gamma / B).
 */
void bn_relu_backward(int64_t B, int64_t H, const float *grad_out, const float *xhat, const float *gate,
                      const float *gamma, const float *rstd, float *grad_a, float *grad_gamma, float *grad_beta) {
    affine_gradients(B, H, grad_out, xhat, gate, grad_a, grad_gamma, grad_beta);
    const float inv_b = 1.0f / (float)B;
    for (int64_t b = 0; b < B; b++) {
        const float *xh = xhat + b * H;
        float *da = grad_a + b * H;
#pragma omp simd
        for (int64_t j = 0; j < H; j++)
            da[j] = gamma[j] * rstd[j] * (da[j] - grad_beta[j] * inv_b - xh[j] * grad_gamma[j] * inv_b);
    }
}

/*
 * A held BatchNorm (running statistics: a fixed per-feature affine map, as a frozen layer of a
 * mapped query) -> ReLU -> dropout: xhat = (a - running_mean) * rstd, out = relu(gamma * xhat +
 * beta) * mask, with rstd (H,) = 1 / sqrt(running_var + eps) given. Writes out, xhat and gate as
 * bn_relu_forward does; the statistics do not move.
 */
void bn_held_relu_forward(int64_t B, int64_t H, const float *a, const float *gamma, const float *beta,
                          const float *running_mean, const float *rstd, const float *mask, float *out, float *xhat,
                          float *gate) {
    normalise_relu_rows(B, H, a, running_mean, rstd, gamma, beta, mask, out, xhat, gate);
}

/*
 * Backward of bn_held_relu_forward (the statistics are constants): with dy = grad_out * gate,
 * d a = gamma rstd dy, d gamma = sum_b dy xhat, d beta = sum_b dy.
 */
void bn_held_relu_backward(int64_t B, int64_t H, const float *grad_out, const float *xhat, const float *gate,
                           const float *gamma, const float *rstd, float *grad_a, float *grad_gamma, float *grad_beta) {
    affine_gradients(B, H, grad_out, xhat, gate, grad_a, grad_gamma, grad_beta);
    for (int64_t b = 0; b < B; b++) {
        float *da = grad_a + b * H;
#pragma omp simd
        for (int64_t j = 0; j < H; j++) da[j] = gamma[j] * rstd[j] * da[j];
    }
}

/*
 * q (B, 2L): mean then log variance per row. var = exp(log var) + var_eps, z = mean + sqrt(var) eps,
 * kl (B,) = KL(N(mean, var) || N(0, I)) = 0.5 sum_l (var + mean^2 - 1 - log var).
 */
void gaussian_head_forward(int64_t B, int64_t L, const float *q, const float *eps, float var_eps, float *z, float *var,
                           float *kl) {
    for (int64_t b = 0; b < B; b++) {
        const float *m = q + b * 2 * L, *lv = m + L, *e = eps + b * L;
        float *zb = z + b * L, *vb = var + b * L;
        float total = 0.0f;
        for (int64_t l = 0; l < L; l++) {
            const float v = expf(lv[l]) + var_eps;
            vb[l] = v;
            zb[l] = m[l] + sqrtf(v) * e[l];
            total += v + m[l] * m[l] - 1.0f - logf(v);
        }
        kl[b] = 0.5f * total;
    }
}

/*
 * Backward of gaussian_head_forward for d loss / d z = grad_z (B, L) and a per-cell weight of the
 * KL term, kl_weight (B,): grad_q (B, 2L) overwritten.
 */
void gaussian_head_backward(int64_t B, int64_t L, const float *q, const float *eps, const float *var,
                            const float *grad_z, const float *kl_weight, float var_eps, float *grad_q) {
    for (int64_t b = 0; b < B; b++) {
        const float *m = q + b * 2 * L, *e = eps + b * L, *vb = var + b * L, *gz = grad_z + b * L;
        float *gm = grad_q + b * 2 * L, *glv = gm + L;
        const float w = kl_weight[b];
        for (int64_t l = 0; l < L; l++) {
            const float v = vb[l];
            gm[l] = gz[l] + w * m[l];
            const float grad_var = 0.5f * gz[l] * e[l] / sqrtf(v) + 0.5f * w * (1.0f - 1.0f / v);
            glv[l] = grad_var * (v - var_eps); /* d var / d log var = exp(log var) */
        }
    }
}
