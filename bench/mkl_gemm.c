/* Intel MKL's own products on a ViT layer's shapes, one thread, to set beside ours
 * (`product_speed`) and PyTorch's (`bench/torch_linear.py`): MKL behind a cargo feature was
 * the untried way to PyTorch's f32 speed on Intel, and this measures what it would give before
 * any code depends on it (bench/RESULTS.md, 2026-12-07 from 21:08 UTC).
 *
 *   pip download --no-deps -d /tmp/mkl mkl-static && (cd /tmp/mkl && unzip -q -o mkl_static-*.whl)
 *   L=$(echo /tmp/mkl/mkl_static-*.data/data/lib)
 *   gcc -O2 bench/mkl_gemm.c -o /tmp/mkl_gemm -Wl,--start-group $L/libmkl_intel_lp64.a \
 *       $L/libmkl_sequential.a $L/libmkl_core.a -Wl,--end-group -lpthread -lm -ldl
 *   /tmp/mkl_gemm 1576 "768,2304;768,3072;3072,768;768,768"
 *
 * For each k,n: C (rows × n) = A (rows × k) · B, GFLOP/s of the best of five timed runs, for
 * f32 with B k × n ("f32"), f32 with B n × k transposed as PyTorch's weights are ("f32 Bt"),
 * and bf16 operands with f32 results (`cblas_gemm_bf16bf16f32`, AMX where the CPU has it). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
void cblas_sgemm(int, int, int, int, int, int, float, const float *, int, const float *, int, float, float *, int);
void cblas_gemm_bf16bf16f32(int, int, int, int, int, int, float, const uint16_t *, int, const uint16_t *, int, float,
                            float *, int);

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static uint16_t bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

int main(int argc, char **argv) {
    int m = argc > 1 ? atoi(argv[1]) : 1576;
    char *shapes = strdup(argc > 2 ? argv[2] : "768,2304;768,3072;3072,768;768,768");
    for (char *shape = strtok(shapes, ";"); shape; shape = strtok(NULL, ";")) {
        int k, n;
        if (sscanf(shape, "%d,%d", &k, &n) != 2) {
            fprintf(stderr, "shapes: k,n;k,n\n");
            return 2;
        }
        float *a = malloc(sizeof(float) * m * k), *b = malloc(sizeof(float) * k * n), *c = malloc(sizeof(float) * m * n);
        uint16_t *ah = malloc(2 * (size_t)m * k), *bh = malloc(2 * (size_t)k * n);
        for (long i = 0; i < (long)m * k; i++) ah[i] = bf16(a[i] = (float)(i % 7) * 0.1f);
        for (long i = 0; i < (long)k * n; i++) bh[i] = bf16(b[i] = (float)(i % 5) * 0.1f);
        int reps = 2000000000L / ((long)m * n * k);
        if (reps < 3) reps = 3;
        printf("rows %5d  k %5d  n %5d:", m, k, n);
        for (int kind = 0; kind < 3; kind++) {
            double best = 1e30;
            for (int round = 0; round < 6; round++) {
                double t0 = now();
                for (int r = 0; r < reps; r++) {
                    if (kind == 0)
                        cblas_sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, m, n, k, 1, a, k, b, n, 0, c, n);
                    else if (kind == 1)
                        cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS, m, n, k, 1, a, k, b, k, 0, c, n);
                    else
                        cblas_gemm_bf16bf16f32(ROW_MAJOR, NO_TRANS, NO_TRANS, m, n, k, 1, ah, k, bh, n, 0, c, n);
                }
                double t = (now() - t0) / reps;
                if (round > 0 && t < best) best = t; /* round 0 warms up */
            }
            printf("  %s %5.0f", kind == 0 ? "f32" : kind == 1 ? "f32 Bt" : "bf16", 2.0 * m * n * k / best / 1e9);
        }
        printf(" GFLOP/s\n");
        free(a), free(b), free(c), free(ah), free(bh);
    }
    return 0;
}
