/*
 * Rows of a CSR matrix gathered into a new CSR block (the minibatch loader's hot loop): one copy
 * per row instead of torch's repeat_interleave + three fancy-index gathers over every nonzero.
 */
#include <stdint.h>
#include <string.h>

/*
 * rows (n,): source rows; indptr/indices/values/log_factorial: the source CSR (+ a per-entry
 * constant); row_ptr (n + 1,): the output's row pointer, already computed by the caller.
 * Writes cols, vals, log_fact and nz_row (the output row of each entry), row_ptr[n] entries each.
 */
void csr_gather_rows(int64_t n, const int64_t *rows, const int64_t *indptr, const int64_t *indices,
                     const float *values, const float *log_factorial, const int64_t *row_ptr, int64_t *cols,
                     float *vals, float *log_fact, int64_t *nz_row, int n_threads) {
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t i = 0; i < n; i++) {
        const int64_t src = indptr[rows[i]], dst = row_ptr[i], len = row_ptr[i + 1] - row_ptr[i];
        memcpy(cols + dst, indices + src, (size_t)len * sizeof(int64_t));
        memcpy(vals + dst, values + src, (size_t)len * sizeof(float));
        memcpy(log_fact + dst, log_factorial + src, (size_t)len * sizeof(float));
        for (int64_t k = 0; k < len; k++) nz_row[dst + k] = i;
    }
}
