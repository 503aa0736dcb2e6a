/*
 * y = x @ W + b for a sparse CSR input x (B, G) and a dense weight W stored (G, H): the first layer
 * of every count encoder. Count matrices are ~5-35 % nonzero, so this costs nnz * H multiply-adds
 * where a dense matmul costs B * G * H; torch's own sparse kernels are slower than its dense matmul
 * at these sizes on CPU (measured), hence this file.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* 8 floats: gcc/clang vector extensions, one AVX register (two SSE/NEON ones elsewhere) */
typedef float vec8 __attribute__((vector_size(32)));
typedef float vec8_unaligned __attribute__((vector_size(32), aligned(4)));

/*
 * out[0:H] = init[0:H] (zero if NULL) + sum_k weights[k] * matrix[index[k] * H : +H], k < n, summed
 * in k order. Column blocks of 64 keep their sums in eight vector registers over all k, so each term
 * costs one load of the matrix row: accumulating in out (a load and a store per term as well) made
 * the forward 1.6-1.7x slower at the VAE's sizes (benchmarks/probe_sparse_linear_kernel.py).
 */
static inline void weighted_row_sum(int64_t H, int64_t n, const int64_t *index, const float *weights,
                                    const float *matrix, const float *init, float *out) {
    int64_t j0 = 0;
    for (; j0 + 64 <= H; j0 += 64) {
        vec8 acc[8];
        for (int r = 0; r < 8; r++) acc[r] = init ? *(const vec8_unaligned *)(init + j0 + 8 * r) : (vec8){0};
        for (int64_t k = 0; k < n; k++) {
            const float v = weights[k];
            const float *row = matrix + index[k] * H + j0;
            for (int r = 0; r < 8; r++) acc[r] += v * *(const vec8_unaligned *)(row + 8 * r);
        }
        for (int r = 0; r < 8; r++) *(vec8_unaligned *)(out + j0 + 8 * r) = acc[r];
    }
    if (j0 == H) return;
    /* the last H % 64 columns, summed in out */
    for (int64_t j = j0; j < H; j++) out[j] = init ? init[j] : 0.0f;
    for (int64_t k = 0; k < n; k++) {
        const float v = weights[k];
        const float *row = matrix + index[k] * H;
#pragma omp simd
        for (int64_t j = j0; j < H; j++) out[j] += v * row[j];
    }
}

/* out (B, H) = bias + sum over row b's nonzeros of value * W[col]; bias may be NULL */
void sparse_linear_forward(int64_t B, int64_t H, const int64_t *row_ptr, const int64_t *cols, const float *values,
                           const float *weight, const float *bias, float *out, int n_threads) {
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t b = 0; b < B; b++)
        weighted_row_sum(H, row_ptr[b + 1] - row_ptr[b], cols + row_ptr[b], values + row_ptr[b], weight, bias,
                         out + b * H);
}

/*
 * grad_weight (G, H) = x^T @ grad_out, overwritten. The nonzeros are first bucketed by column (a
 * counting sort, stable in the row), so each row of grad_weight is summed in registers by one thread
 * and written once: no zeroing pass over (G, H), no read-modify-write, no two threads on one row.
 * The bucketing itself runs on all threads, each over its own block of rows (it ran on one).
 */
void sparse_linear_backward_weight(int64_t B, int64_t G, int64_t H, const int64_t *row_ptr, const int64_t *cols,
                                   const float *values, const float *grad_out, float *grad_weight, int n_threads) {
    const int64_t nnz = row_ptr[B];
    const int max_threads = n_threads > 0 ? n_threads : 1;
    int64_t *col_ptr = malloc(((size_t)G + 1) * sizeof(int64_t));
    /* slot[t * G + g]: where thread t's next entry of column g goes (first its count) */
    int64_t *slot = calloc((size_t)max_threads * (size_t)G, sizeof(int64_t));
    int64_t *entry_row = malloc((size_t)(nnz > 0 ? nnz : 1) * sizeof(int64_t));
    float *entry_value = malloc((size_t)(nnz > 0 ? nnz : 1) * sizeof(float));
    if (!col_ptr || !slot || !entry_row || !entry_value) {
        /* out of memory for the buckets (small next to the weight): the direct, serial sum */
        memset(grad_weight, 0, (size_t)(G * H) * sizeof(float));
        for (int64_t b = 0; b < B; b++)
            for (int64_t k = row_ptr[b]; k < row_ptr[b + 1]; k++)
                for (int64_t j = 0; j < H; j++) grad_weight[cols[k] * H + j] += values[k] * grad_out[b * H + j];
        free(col_ptr);
        free(slot);
        free(entry_row);
        free(entry_value);
        return;
    }
#pragma omp parallel num_threads(max_threads)
    {
#ifdef _OPENMP
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
#else
        const int64_t t = 0, T = 1;
#endif
        /* the same block of rows in both passes; thread order keeps each column's entries in row order */
        const int64_t first = B * t / T, last = B * (t + 1) / T;
        int64_t *own = slot + t * G;
        for (int64_t k = row_ptr[first]; k < row_ptr[last]; k++) own[cols[k]]++;
#pragma omp barrier
#pragma omp single
        {
            int64_t running = 0;
            for (int64_t g = 0; g < G; g++) {
                col_ptr[g] = running;
                for (int64_t u = 0; u < T; u++) {
                    const int64_t count = slot[u * G + g];
                    slot[u * G + g] = running;
                    running += count;
                }
            }
            col_ptr[G] = running;
        }
        for (int64_t b = first; b < last; b++)
            for (int64_t k = row_ptr[b]; k < row_ptr[b + 1]; k++) {
                const int64_t at = own[cols[k]]++;
                entry_row[at] = b;
                entry_value[at] = values[k];
            }
#pragma omp barrier
#pragma omp for schedule(dynamic, 32)
        for (int64_t g = 0; g < G; g++)
            weighted_row_sum(H, col_ptr[g + 1] - col_ptr[g], entry_row + col_ptr[g], entry_value + col_ptr[g],
                             grad_out, 0, grad_weight + g * H);
    }
    free(col_ptr);
    free(slot);
    free(entry_row);
    free(entry_value);
}
