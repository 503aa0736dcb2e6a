/*
 * Two independent float32 matrix products at once, one per thread, each with a single-threaded
 * BLAS call. At the VAE's sizes (128 x 128 x 2G) a product split over two threads by the BLAS
 * gains 1.0-1.6x on this project's 2-core machine, and nothing when the second core is contended;
 * two products side by side, each on its own core, run at single-thread peak (measured: the
 * decoder's two backward products in 0.95 ms against 1.6-1.75 ms one after the other). One product
 * is split by output columns into two such halves (sclatent/modules/fused_elbo.py).
 *
 * The BLAS is the one torch links (MKL on x86 Linux wheels): the caller passes the addresses of its
 * Fortran sgemm_ and of MKL_Set_Num_Threads_Local, found in torch's library; without them the
 * caller uses torch's matmul instead. Row-major matrices throughout; the Fortran (column-major)
 * call computes the transposed product.
 */
#include <stdint.h>

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);
typedef int (*set_local_threads_fn)(int);

/* C (M x N, row stride ldc) = alpha op(A) op(B) + beta C; op(A) (M x K) is A (row stride lda), or
 * A^T for A stored (K x M) when trans_a; likewise op(B) (K x N) with trans_b. */
static void gemm_row_major(sgemm_fn sgemm, const int64_t *shape, float alpha, const float *A, const float *B,
                           float beta, float *C) {
    const int trans_a = (int)shape[0], trans_b = (int)shape[1], M = (int)shape[2], N = (int)shape[3],
              K = (int)shape[4], lda = (int)shape[5], ldb = (int)shape[6], ldc = (int)shape[7];
    if (M <= 0 || N <= 0) return;
    /* column-major view: C^T (N x M) = op(B)^T (N x K) op(A)^T (K x M) */
    sgemm(trans_b ? "T" : "N", trans_a ? "T" : "N", &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

/* the two products of gemm_pair, each described by the arguments of gemm_row_major */
void gemm_pair(void *sgemm_address, void *set_local_threads_address, const int64_t *shape, const float *alphas,
               const float *betas, const float *a1, const float *b1, float *c1, const float *a2, const float *b2,
               float *c2) {
    sgemm_fn sgemm = (sgemm_fn)sgemm_address;
    set_local_threads_fn set_local_threads = (set_local_threads_fn)set_local_threads_address;
    /* shape: per product trans_a, trans_b, M, N, K, lda, ldb, ldc */
#pragma omp parallel sections num_threads(2)
    {
#pragma omp section
        {
            int previous = set_local_threads(1);
            gemm_row_major(sgemm, shape, alphas[0], a1, b1, betas[0], c1);
            set_local_threads(previous);
        }
#pragma omp section
        {
            int previous = set_local_threads(1);
            gemm_row_major(sgemm, shape + 8, alphas[1], a2, b2, betas[1], c2);
            set_local_threads(previous);
        }
    }
}
