/*
 * y = x @ W + b for a sparse CSR input x (B, G) and a dense weight W stored (G, H): the first layer
 * of every count encoder. Count matrices are ~5-20 % nonzero, so this costs nnz * H multiply-adds
 * where a dense matmul costs B * G * H; torch's own sparse kernels are slower than its dense matmul
 * at these sizes on CPU (measured), hence this file.
 */
#include <stdint.h>
#include <stdlib.h>
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
 * grad_weight (G, H) = x^T @ grad_out, overwritten. The nonzeros are first bucketed by column (a
 * counting sort, stable in the row), so each row of grad_weight is summed in cache by one thread
 * and written once: no zeroing pass over (G, H), no read-modify-write, no two threads on one row.
 */
void sparse_linear_backward_weight(int64_t B, int64_t G, int64_t H, const int64_t *row_ptr, const int64_t *cols,
                                   const float *values, const float *grad_out, float *grad_weight, int n_threads) {
    const int64_t nnz = row_ptr[B];
    int64_t *col_ptr = calloc((size_t)G + 1, sizeof(int64_t));
    int64_t *fill = malloc(((size_t)G + 1) * sizeof(int64_t));
    int64_t *entry_row = malloc((size_t)(nnz > 0 ? nnz : 1) * sizeof(int64_t));
    float *entry_value = malloc((size_t)(nnz > 0 ? nnz : 1) * sizeof(float));
    if (!col_ptr || !fill || !entry_row || !entry_value) {
        /* out of memory for the buckets (tiny next to the weight): the direct, serial sum */
        memset(grad_weight, 0, (size_t)(G * H) * sizeof(float));
        for (int64_t b = 0; b < B; b++)
            for (int64_t k = row_ptr[b]; k < row_ptr[b + 1]; k++)
                for (int64_t j = 0; j < H; j++) grad_weight[cols[k] * H + j] += values[k] * grad_out[b * H + j];
        free(col_ptr);
        free(fill);
        free(entry_row);
        free(entry_value);
        return;
    }
    for (int64_t k = 0; k < nnz; k++) col_ptr[cols[k] + 1]++;
    for (int64_t g = 0; g < G; g++) col_ptr[g + 1] += col_ptr[g];
    memcpy(fill, col_ptr, ((size_t)G + 1) * sizeof(int64_t));
    for (int64_t b = 0; b < B; b++)
        for (int64_t k = row_ptr[b]; k < row_ptr[b + 1]; k++) {
            const int64_t slot = fill[cols[k]]++;
            entry_row[slot] = b;
            entry_value[slot] = values[k];
        }
#pragma omp parallel for schedule(dynamic, 32) num_threads(n_threads)
    for (int64_t g = 0; g < G; g++) {
        float *gw = grad_weight + g * H;
        memset(gw, 0, (size_t)H * sizeof(float));
        for (int64_t k = col_ptr[g]; k < col_ptr[g + 1]; k++) {
            const float v = entry_value[k];
            const float *d = grad_out + entry_row[k] * H;
#pragma omp simd
            for (int64_t j = 0; j < H; j++) gw[j] += v * d[j];
        }
    }
    free(col_ptr);
    free(fill);
    free(entry_row);
    free(entry_value);
}
