/*
 * y = x @ W + b for a sparse CSR input x (B, G) and a dense weight W stored (G, H): the first layer
 * of every count encoder. Count matrices are ~5-20 % nonzero, so this costs nnz * H multiply-adds
 * where a dense matmul costs B * G * H; torch's own sparse kernels are slower than its dense matmul
 * at these sizes on CPU (measured), hence this file.
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* out (B, H) = bias + sum over row b's nonzeros of value * W[col]; bias may be NULL */
void sparse_linear_forward(int64_t B, int64_t H, const int64_t *row_ptr, const int64_t *cols, const float *values,
                           const float *weight, const float *bias, float *out, int n_threads) {
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t b = 0; b < B; b++) {
        float *y = out + b * H;
        if (bias)
            memcpy(y, bias, (size_t)H * sizeof(float));
        else
            memset(y, 0, (size_t)H * sizeof(float));
        for (int64_t k = row_ptr[b]; k < row_ptr[b + 1]; k++) {
            const float v = values[k];
            const float *w = weight + cols[k] * H;
#pragma omp simd
            for (int64_t j = 0; j < H; j++) y[j] += v * w[j];
        }
    }
}

/*
 * grad_weight (G, H) = x^T @ grad_out, overwritten (zeroed first). Threads split the H columns, so
 * no two threads write the same element and no atomics are needed.
 */
void sparse_linear_backward_weight(int64_t B, int64_t G, int64_t H, const int64_t *row_ptr, const int64_t *cols,
                                   const float *values, const float *grad_out, float *grad_weight, int n_threads) {
#pragma omp parallel num_threads(n_threads)
    {
        int n = 1, t = 0;
#ifdef _OPENMP
        n = omp_get_num_threads();
        t = omp_get_thread_num();
#endif
        /* column blocks of 8 floats keep each thread's stores in whole vectors */
        int64_t blocks = (H + 7) / 8;
        int64_t begin = (blocks * t / n) * 8, end = (blocks * (t + 1) / n) * 8;
        if (end > H) end = H;
        if (begin < end) {
            for (int64_t g = 0; g < G; g++) memset(grad_weight + g * H + begin, 0, (size_t)(end - begin) * sizeof(float));
            for (int64_t b = 0; b < B; b++) {
                const float *d = grad_out + b * H;
                for (int64_t k = row_ptr[b]; k < row_ptr[b + 1]; k++) {
                    const float v = values[k];
                    float *gw = grad_weight + cols[k] * H;
#pragma omp simd
                    for (int64_t j = begin; j < end; j++) gw[j] += v * d[j];
                }
            }
        }
    }
}
