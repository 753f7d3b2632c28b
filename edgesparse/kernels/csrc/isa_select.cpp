// Load-time ISA choice and the whole-operator C entry points.
// C headers only (usable in wasm32-wasi and bare ARM builds).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "es_kernels.h"

extern "C" {
extern const es_kernel_table es_table_generic;
#if defined(ES_HAVE_AVX2)
extern const es_kernel_table es_table_avx2;
#endif
#if defined(ES_HAVE_AVX512)
extern const es_kernel_table es_table_avx512;
#endif
}

static int cpu_supports(const char* isa) {
  if (strcmp(isa, "generic") == 0) return 1;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // libgcc also checks that the OS saves the wide registers (XCR0).
  if (strcmp(isa, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (strcmp(isa, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
#endif
  return 0;
}

extern "C" ES_API const es_kernel_table* es_kernels_for(const char* isa) {
  const es_kernel_table* all[] = {
#if defined(ES_HAVE_AVX512)
      &es_table_avx512,
#endif
#if defined(ES_HAVE_AVX2)
      &es_table_avx2,
#endif
      &es_table_generic,
  };
  for (const es_kernel_table* t : all)
    if (strcmp(t->isa, isa) == 0) return cpu_supports(isa) ? t : nullptr;
  return nullptr;
}

extern "C" ES_API const es_kernel_table* es_kernels(void) {
  // Not cached: the ORT glue calls this once per kernel instance (session
  // creation), so EDGESPARSE_ISA can differ between sessions of one process.
  const es_kernel_table* t = nullptr;
  const char* want = getenv("EDGESPARSE_ISA");
  if (want && *want) t = es_kernels_for(want);
  if (!t) t = es_kernels_for("avx512");
  if (!t) t = es_kernels_for("avx2");
  if (!t) t = &es_table_generic;
  return t;
}

extern "C" ES_API const char* es_bsmm_validate(int64_t nnzb, int32_t block, int64_t n, int64_t k,
                                                const int32_t* k_index, const int32_t* row_ptr,
                                                int64_t row_ptr_len, int64_t* max_k) {
  if (block != 4 && block != 8 && block != 16) return "block size must be 4, 8 or 16";
  if (n <= 0) return "N must be positive";
  const int64_t nb = (n + block - 1) / block;
  if (row_ptr_len != nb + 1) return "row_ptr must have ceil(N / block) + 1 entries";
  if (row_ptr[0] != 0) return "row_ptr[0] must be 0";
  if (row_ptr[nb] != nnzb) return "row_ptr[-1] must equal the number of blocks";
  // Row pointers first (monotone and ending at nnzb keeps every block index
  // inside [0, nnzb) before k_index is read).
  for (int64_t j = 0; j < nb; ++j)
    if (row_ptr[j + 1] < row_ptr[j]) return "row_ptr must be non-decreasing";
  int64_t kmax = 0;
  for (int64_t j = 0; j < nb; ++j) {
    for (int64_t p = row_ptr[j]; p < row_ptr[j + 1]; ++p) {
      if (k_index[p] < 0) return "k_index has a negative entry";
      if (k >= 0 && k_index[p] >= k) return "k_index has an entry >= K (input features)";
      if (p > row_ptr[j] && k_index[p] <= k_index[p - 1])
        return "k_index must be strictly ascending within a block row";
      if (k_index[p] + 1 > kmax) kmax = k_index[p] + 1;
    }
  }
  if (max_k) *max_k = kmax;
  return nullptr;
}

// Aligned kernel scratch (es_scratch_align); *raw is what to free.
static float* scratch_alloc(size_t floats, void** raw) {
  *raw = malloc(sizeof(float) * floats + ES_SCRATCH_PAD);
  return *raw ? es_scratch_align(*raw) : nullptr;
}

extern "C" ES_API void es_bsmm_f32(const es_bsmm_args* a) {
  const es_kernel_table* t = es_kernels();
  const int64_t nb = (a->n + a->block - 1) / a->block;
  float* xp = nullptr;
  void* raw = nullptr;
  if (a->m > 1) {
    xp = scratch_alloc((size_t)(a->m * a->k + 16), &raw);
    if (!xp) return;
    t->bsmm_pack(a, xp, 0, a->m);
  }
  t->bsmm_range(a, xp, 0, a->m, 0, nb);
  free(raw);
}

extern "C" ES_API void es_bsconv_f32(const es_bsconv_args* a) {
  const es_kernel_table* t = es_kernels();
  const int64_t nb = (a->cout + a->block - 1) / a->block;
  if (a->x_block > 1 || a->y_block > 1) {
    for (int64_t n = 0; n < a->batch; ++n) t->bsconv16_range(a, n, 0, a->h * a->w, 0, nb);
    return;
  }
  const int64_t need = t->bsconv_prepared_floats(a);
  void* raw = nullptr;
  float* prep = need ? scratch_alloc((size_t)need, &raw) : nullptr;
  if (need && !prep) return;
  for (int64_t n = 0; n < a->batch; ++n) {
    t->bsconv_prepare(a, prep, n, 0, a->cin, nullptr);
    t->bsconv_range(a, prep, n, 0, t->bsconv_positions(a), 0, nb);
  }
  free(raw);
}

extern "C" ES_API void es_gffn_f32(const es_gffn_args* a) {
  const es_kernel_table* t = es_kernels();
  void* raw = nullptr;
  float* scratch = scratch_alloc((size_t)(t->gffn_scratch(a) + 16), &raw);
  if (!scratch) return;
  t->gffn_range(a, scratch, 0, a->t);
  free(raw);
}

extern "C" ES_API void es_dwconv_f32(const es_dwconv_args* a) {
  const es_kernel_table* t = es_kernels();
  if (a->channel_block > 1) {
    for (int64_t n = 0; n < a->batch; ++n) t->dwconv16_range(a, n, 0, a->channels / 16);
    return;
  }
  void* raw = nullptr;
  float* scratch = scratch_alloc((size_t)t->dwconv_scratch(a), &raw);
  if (!scratch) return;
  for (int64_t n = 0; n < a->batch; ++n) t->dwconv_range(a, scratch, n, 0, a->channels);
  free(raw);
}
