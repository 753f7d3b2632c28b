// Picks the widest kernel copy this CPU runs, once (override: DELTALLM_ISA=generic|avx2|avx512).
#include <stdlib.h>
#include <string.h>

#include "delta_attention.h"

extern "C" {
extern const dl_table dl_table_generic;
#ifdef DL_HAVE_AVX2
extern const dl_table dl_table_avx2;
#endif
#ifdef DL_HAVE_AVX512
extern const dl_table dl_table_avx512;
#endif
}

static const dl_table* pick() {
  const char* want = getenv("DELTALLM_ISA");
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#endif
#ifdef DL_HAVE_AVX512
  if ((!want || !strcmp(want, "avx512")) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq"))
    return &dl_table_avx512;
#endif
#ifdef DL_HAVE_AVX2
  if ((!want || !strcmp(want, "avx2") || !strcmp(want, "avx512")) && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma"))
    return &dl_table_avx2;
#endif
  return &dl_table_generic;
}

extern "C" const dl_table* dl_generic_kernels(void) { return &dl_table_generic; }

extern "C" const dl_table* dl_kernels(void) {
  static const dl_table* table = pick();
  return table;
}
