// Exports of the browser/node kernel module (wasm32, SIMD128, no WASI imports):
// esw_bsmm (BlockSparseMatMul) and esw_bsconv (BlockSparseConv).
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

static float* g_prep = nullptr;  // prepared conv input (phase planes), grows, never shrinks
static int64_t g_prep_floats = 0;

// NCHW convolution with block-sparse weights (layout: es_kernels.h); oh/ow computed by the caller.
// Returns 0, -1 when the scratch cannot be allocated, -2 when the kernel has too many taps.
ESW_EXPORT(esw_bsconv)
int32_t esw_bsconv(const float* x, int32_t batch, int32_t cin, int32_t h, int32_t w, int32_t cout, int32_t kh,
                   int32_t kw, int32_t stride_h, int32_t stride_w, int32_t dil_h, int32_t dil_w, int32_t pad_top,
                   int32_t pad_left, int32_t oh, int32_t ow, int32_t block, int32_t activation,
                   const float* values, const int32_t* c_index, const int32_t* row_ptr, const float* bias,
                   float* y) {
  if ((int64_t)kh * kw > 256) return -2;  // ES_CONV_MAX_TAPS in bsconv_kernel.h
  es_bsconv_args a = {};  // zeroed: fields added later (residual) stay NULL
  a.x = x;
  a.batch = batch, a.cin = cin, a.h = h, a.w = w;
  a.cout = cout, a.kh = kh, a.kw = kw, a.stride_h = stride_h, a.stride_w = stride_w;
  a.dil_h = dil_h, a.dil_w = dil_w, a.pad_top = pad_top, a.pad_left = pad_left, a.oh = oh, a.ow = ow;
  a.block = block, a.activation = activation;
  a.values = values, a.c_index = c_index, a.row_ptr = row_ptr, a.bias = bias, a.y = y;
  const es_kernel_table* t = &es_table_generic;
  const int64_t need = t->bsconv_prepared_floats(&a);
  if (need > g_prep_floats) {
    free(g_prep);
    g_prep = (float*)malloc(sizeof(float) * (size_t)need);
    g_prep_floats = g_prep ? need : 0;
    if (!g_prep) return -1;
  }
  const int64_t nb = ((int64_t)cout + block - 1) / block;
  for (int64_t n = 0; n < batch; ++n) {
    t->bsconv_prepare(&a, need ? g_prep : nullptr, n, 0, cin, nullptr);
    t->bsconv_range(&a, need ? g_prep : nullptr, n, 0, t->bsconv_positions(&a), 0, nb);
  }
  return 0;
}
