// Exports of the browser/node kernel module (wasm32, SIMD128, no WASI imports).
//
// The JS runtime (js/edgesparse.mjs) copies each sparse node's packed weights into this module's
// memory once, at load, and then calls esw_bsmm per node and run. Only the pure kernels of
// edgesparse/kernels/csrc (the "generic" 16-byte-vector table, which is SIMD128 here) are linked:
// isa_select.cpp is left out because its getenv() would pull in WASI environment imports, and a
// browser has no WASI. Sizes are int32 at this boundary so JS never handles BigInt.
#include <stdint.h>
#include <stdlib.h>

#include "es_kernels.h"

extern "C" const es_kernel_table es_table_generic;

#define ESW_EXPORT(name) extern "C" __attribute__((export_name(#name), visibility("default")))

static float* g_scratch = nullptr;  // packed X (grows, never shrinks)
static int64_t g_scratch_floats = 0;

ESW_EXPORT(esw_malloc) void* esw_malloc(int32_t bytes) { return malloc((size_t)(bytes > 0 ? bytes : 1)); }

ESW_EXPORT(esw_free) void esw_free(void* p) { free(p); }

ESW_EXPORT(esw_isa) const char* esw_isa(void) { return es_table_generic.isa; }

ESW_EXPORT(esw_vec_floats) int32_t esw_vec_floats(void) { return es_table_generic.vec_floats; }

// Y[m, n] = act(X[m, k] @ W + bias) with W in block x 1 blocks (layout: es_kernels.h).
// Returns 0, or -1 when the packing scratch cannot be allocated.
ESW_EXPORT(esw_bsmm)
int32_t esw_bsmm(const float* x, int32_t m, int32_t k, int32_t n, int32_t block, int32_t activation,
                 const float* values, const int32_t* k_index, const int32_t* row_ptr, const float* bias,
                 float* y) {
  es_bsmm_args a;
  a.x = x;
  a.m = m;
  a.k = k;
  a.n = n;
  a.block = block;
  a.activation = activation;
  a.values = values;
  a.k_index = k_index;
  a.row_ptr = row_ptr;
  a.bias = bias;
  a.y = y;
  const es_kernel_table* t = &es_table_generic;
  const int64_t nb = ((int64_t)n + block - 1) / block;
  float* xp = nullptr;
  if (m > 1) {
    const int64_t need = (int64_t)m * k + 16;
    if (need > g_scratch_floats) {
      free(g_scratch);
      g_scratch = (float*)malloc(sizeof(float) * (size_t)need);
      g_scratch_floats = g_scratch ? need : 0;
      if (!g_scratch) return -1;
    }
    xp = g_scratch;
    if (t->bsmm_pack(&a, xp, 0, m) != 0) xp = nullptr;
  }
  t->bsmm_range(&a, xp, 0, m, 0, nb);
  return 0;
}
