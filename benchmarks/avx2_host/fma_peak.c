/* The FMA peak of one core for 8-float (AVX2) and 16-float (AVX-512) vectors, in GFLOP/s: twelve
 * independent multiply-add chains per loop, more than latency x ports, so only the FMA units'
 * throughput limits it. Prints one JSON object: {"avx2": best, "avx512": best or null}.
 * The yardstick for the peers' AVX2 figures (docs/peers.md): code that computes faster than the
 * AVX2 peak is not running AVX2 code, whatever CPUID said.
 *   cc -O2 -o /tmp/fma_peak benchmarks/avx2_host/fma_peak.c && /tmp/fma_peak */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Distinct start values keep the compiler from merging the chains into one. */
#define CHAINS(V, SET, FMA, LANES)                                                             \
  V a0 = SET(1), a1 = SET(2), a2 = SET(3), a3 = SET(4), a4 = SET(5), a5 = SET(6), a6 = SET(7),  \
    a7 = SET(8), a8 = SET(9), a9 = SET(10), a10 = SET(11), a11 = SET(12);                       \
  const V b = SET(0.999999f), c = SET(1e-7f);                                                   \
  double t = now();                                                                             \
  for (long i = 0; i < n; ++i) {                                                                \
    a0 = FMA(a0, b, c); a1 = FMA(a1, b, c); a2 = FMA(a2, b, c); a3 = FMA(a3, b, c);             \
    a4 = FMA(a4, b, c); a5 = FMA(a5, b, c); a6 = FMA(a6, b, c); a7 = FMA(a7, b, c);             \
    a8 = FMA(a8, b, c); a9 = FMA(a9, b, c); a10 = FMA(a10, b, c); a11 = FMA(a11, b, c);         \
  }                                                                                             \
  t = now() - t;                                                                                \
  V s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;                            \
  sink += s[0];                                                                                 \
  return n * 12.0 * 2 * LANES / t / 1e9;

static volatile float sink;

__attribute__((target("avx2,fma"))) static double avx2(long n) { CHAINS(__m256, _mm256_set1_ps, _mm256_fmadd_ps, 8) }
__attribute__((target("avx512f"))) static double avx512(long n) { CHAINS(__m512, _mm512_set1_ps, _mm512_fmadd_ps, 16) }

int main(void) {
  __builtin_cpu_init();
  const int has512 = __builtin_cpu_supports("avx512f");
  double best2 = 0, best512 = 0;
  for (int r = 0; r < 5; ++r) {
    double g = avx2(20000000);
    if (g > best2) best2 = g;
    if (has512) {
      g = avx512(20000000);
      if (g > best512) best512 = g;
    }
  }
  if (has512)
    printf("{\"avx2\": %.1f, \"avx512\": %.1f}\n", best2, best512);
  else
    printf("{\"avx2\": %.1f, \"avx512\": null}\n", best2);
  return 0;
}
