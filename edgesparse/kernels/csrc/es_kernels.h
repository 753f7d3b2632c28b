/* edgesparse pure kernels: the C ABI.
 *
 * Plain C declarations, usable from C, C++, a wasm32-wasi test driver or an ARM
 * qemu driver. Every kernel is single threaded per call; callers that own a
 * thread pool split the work with the *_range entry points of es_kernel_table.
 *
 * Layouts are documented in docs/kernels.md ("Operator contracts").
 */
#ifndef EDGESPARSE_ES_KERNELS_H
#define EDGESPARSE_ES_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define ES_API __declspec(dllexport)
#else
#define ES_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Kernel scratch (packed token tiles, GatheredFFN's hidden buffer, conv scratch) starts on a 64-byte
 * line: malloc/new put large buffers 16 bytes into one, which made every 64-byte load of a packed
 * tile a split load (AVX-512 wide tile 0-13 % slower, MiniLM 75 % package ~5 %: docs/kernels.md).
 * Allocate ES_SCRATCH_PAD more bytes and start at es_scratch_align(p). */
#define ES_SCRATCH_PAD 64
static inline float* es_scratch_align(void* p) {
  return (float*)(((uintptr_t)p + ES_SCRATCH_PAD - 1) & ~(uintptr_t)(ES_SCRATCH_PAD - 1));
}

/* Fused activations (attribute strings in the ONNX ops map to these). */
enum {
  ES_ACT_NONE = 0,
  ES_ACT_RELU = 1,
  ES_ACT_GELU = 2, /* erf form: 0.5 x (1 + erf(x / sqrt 2)) */
  ES_ACT_SILU = 3, /* x * sigmoid(x) */
  ES_ACT_RELU6 = 4
};

/* Y[m, n] = act(X[m, k] @ W[k, n] + bias), W block sparse in B x 1 blocks
 * (B consecutive output features, one input feature), block rows of B outputs:
 *   values  [nnzb, B]   block p = W[k_index[p], j*B : j*B+B] (zero padded past n)
 *   k_index [nnzb]      input feature of block p, ascending inside a block row
 *   row_ptr [nb + 1]    blocks of block row j are row_ptr[j] .. row_ptr[j+1]-1
 * nb = ceil(n / B). bias may be NULL. Inputs are assumed valid (see
 * es_bsmm_validate). */
typedef struct es_bsmm_args {
  const float* x;
  int64_t m, k, n;
  int32_t block, activation;
  const float* values;
  const int32_t* k_index;
  const int32_t* row_ptr;
  const float* bias;
  float* y;
} es_bsmm_args;

/* NCHW 2-D convolution with block-sparse weights: a block is B consecutive
 * output channels x 1 input channel x all kh*kw taps.
 *   values  [nnzb, kh*kw, B]  values[p, t, b] = W[j*B+b, c_index[p], t / kw, t % kw]
 *   c_index [nnzb]            input channel of block p, ascending in a block row
 *   row_ptr [nb + 1]          nb = ceil(cout / B)
 * Output y is [batch, cout, oh, ow]; oh/ow are computed by the caller. */
typedef struct es_bsconv_args {
  const float* x;
  int64_t batch, cin, h, w;
  int64_t cout, kh, kw, stride_h, stride_w, dil_h, dil_w;
  int64_t pad_top, pad_left; /* bottom/right pads are implied by oh/ow */
  int64_t oh, ow;
  int32_t block, activation;
  const float* values;
  const int32_t* c_index;
  const int32_t* row_ptr;
  const float* bias;
  float* y;
  /* Optional (NULL: none), [batch, cout, oh, ow]: added to act(conv + bias), i.e. a residual Add
   * that follows the conv. May not alias y. */
  const float* residual;
  /* Channel layouts: 0 or 1 = NCHW; 16 = NCHW16c ([N, C/16, H, W, 16], C a multiple of 16). The
   * residual has y's layout. Anything but NCHW in and out needs the bsconv16 contract (1x1, stride
   * 1, no padding, block 16): see nchw16c_kernel.h. */
  int32_t x_block, y_block;
} es_bsconv_args;

/* NCHW depthwise 2-D convolution (group = channels, one filter per channel), fused bias and
 * activation. weights [channels, kh*kw] (ONNX Conv's [C, 1, kh, kw] as is), bias [channels] or
 * NULL. Output y is [batch, channels, oh, ow]; oh/ow are computed by the caller. */
typedef struct es_dwconv_args {
  const float* x;
  int64_t batch, channels, h, w;
  int64_t kh, kw, stride_h, stride_w, dil_h, dil_w;
  int64_t pad_top, pad_left; /* bottom/right pads are implied by oh/ow */
  int64_t oh, ow;
  int32_t activation;
  int32_t channel_block; /* 0 or 1: X and Y NCHW; 16: both NCHW16c (channels a multiple of 16) */
  const float* weights;
  const float* bias;
  float* y;
} es_dwconv_args;

/* Gathered FFN for activation sparsity. Intermediate neurons are grouped in
 * experts (blocks) of size s; only the n_active experts listed in `experts`
 * are computed for all t tokens of the chunk:
 *   h_e = act(x @ w_gate[e] + b_gate[e]) * (x @ w_up[e] + b_up[e])   (gated)
 *   h_e = act(x @ w_up[e] + b_up[e])                                    (plain)
 *   y   = sum_e h_e @ w_down[e] + b_down
 * Layouts (all row major, pre-packed by the Python helper):
 *   x [t, d], w_up / w_gate [e_total, d, s], w_down [e_total, s, d_out],
 *   b_up / b_gate [e_total, s] (NULL allowed), b_down [d_out] (NULL allowed),
 *   experts int32 [n_active] in [0, e_total), y [t, d_out].
 * w_gate NULL means plain (non-gated) FFN. s and d_out must be multiples of 4. */
typedef struct es_gffn_args {
  const float* x;
  int64_t t, d, d_out, s, e_total, n_active;
  int32_t activation, _pad;
  const float* w_up;
  const float* w_gate;
  const float* w_down;
  const float* b_up;
  const float* b_gate;
  const float* b_down;
  const int32_t* experts;
  float* y;
  /* Optional (NULL: all 1), RoutedFFN: [t, e_total] row-major; the activated h of expert e for
   * token t is multiplied by scales[t * e_total + e] before the down projection. */
  const float* scales;
} es_gffn_args;

/* One ISA's kernels. Range entry points compute a part of the output so that a
 * caller can spread the calls over threads; ranges never overlap in output. */
typedef struct es_kernel_table {
  const char* isa;   /* "generic", "avx2", "avx512" */
  int32_t vec_floats; /* native vector width in floats */
  /* Tokens per register tile of the output-vectorised path for a block size.
   * Split token ranges on bsmm_tile(a) (end of the table), which also covers
   * the token-vectorised paths and evens out the tiles of a call. */
  int32_t (*bsmm_tile_m)(int32_t block);

  /* Pack rows [m_begin, m_end) of x for bsmm (m_begin a multiple of the tile).
   * xp must hold m * k floats; returns nonzero when packing is not used
   * (m == 1: then pass xp = NULL to bsmm_range). */
  int (*bsmm_pack)(const es_bsmm_args* a, float* xp, int64_t m_begin, int64_t m_end);
  /* Tokens [m_begin, m_end) (multiples of bsmm_tile(a) except at m) x block
   * rows [j_begin, j_end). xp is the packed x, or NULL when m == 1. */
  void (*bsmm_range)(const es_bsmm_args* a, const float* xp, int64_t m_begin, int64_t m_end,
                     int64_t j_begin, int64_t j_end);

  /* Convolution: output positions are enumerated on a virtual grid (see
   * bsconv_kernel.h); ranges are split on multiples of bsconv_tile(block). */
  int32_t (*bsconv_tile)(int32_t block);
  /* Floats of prepared input for one image (0: X is read directly). */
  int64_t (*bsconv_prepared_floats)(const es_bsconv_args* a);
  /* Prepare input channels [c_begin, c_end) of image n; used[c] == 0 skips a
   * channel no block reads (used may be NULL). */
  void (*bsconv_prepare)(const es_bsconv_args* a, float* prep, int64_t n, int64_t c_begin, int64_t c_end,
                         const uint8_t* used);
  /* Number of virtual output positions per image. */
  int64_t (*bsconv_positions)(const es_bsconv_args* a);
  /* Image n, virtual positions [q_begin, q_end), block rows [j_begin, j_end). */
  void (*bsconv_range)(const es_bsconv_args* a, const float* prep, int64_t n, int64_t q_begin, int64_t q_end,
                       int64_t j_begin, int64_t j_end);

  /* Gathered FFN. Token ranges split on multiples of gffn_tile_m(); scratch
   * (gffn_scratch floats) holds the packed x and the activated h. Order:
   * gffn_pack (all tokens), then gffn_up (all tokens x active experts), then
   * gffn_down (all tokens x output columns, split on multiples of 16). */
  int32_t (*gffn_tile_m)(void);
  int64_t (*gffn_scratch)(const es_gffn_args* a);
  void (*gffn_pack)(const es_gffn_args* a, float* scratch, int64_t t_begin, int64_t t_end);
  void (*gffn_up)(const es_gffn_args* a, float* scratch, int64_t t_begin, int64_t t_end, int64_t i_begin,
                  int64_t i_end);
  void (*gffn_down)(const es_gffn_args* a, const float* scratch, int64_t t_begin, int64_t t_end, int64_t n_begin,
                    int64_t n_end);
  /* All three phases for tokens [t_begin, t_end), single threaded. */
  void (*gffn_range)(const es_gffn_args* a, float* scratch, int64_t t_begin, int64_t t_end);

  /* Tokens per packed tile for this call (pack and range split on it). The
   * packed x needs m * k + vec_floats floats (the last tile may over-read). */
  int32_t (*bsmm_tile)(const es_bsmm_args* a);

  /* Depthwise convolution: floats of per-caller scratch, then channels [c_begin, c_end) of
   * image n (callers split channels over threads, each with its own scratch). */
  int64_t (*dwconv_scratch)(const es_dwconv_args* a);
  void (*dwconv_range)(const es_dwconv_args* a, float* scratch, int64_t n, int64_t c_begin, int64_t c_end);
  /* NCHW16c (nchw16c_kernel.h): pointwise conv, image n, positions [q_begin, q_end) of h*w, block
   * rows [j_begin, j_end); depthwise conv, image n, 16-channel blocks [cb_begin, cb_end). */
  void (*bsconv16_range)(const es_bsconv_args* a, int64_t n, int64_t q_begin, int64_t q_end, int64_t j_begin,
                         int64_t j_end);
  void (*dwconv16_range)(const es_dwconv_args* a, int64_t n, int64_t cb_begin, int64_t cb_end);
} es_kernel_table;

/* The table of the best ISA this CPU supports among those compiled in, or the
 * one named by the EDGESPARSE_ISA environment variable if compiled in and
 * supported. Never NULL. */
ES_API const es_kernel_table* es_kernels(void);
/* Table for a named ISA, or NULL if not compiled in or not supported here. */
ES_API const es_kernel_table* es_kernels_for(const char* isa);

/* Validation: returns NULL when valid, else a static/thread-local message. k
 * may be -1 when unknown (then only the non-negativity of k_index is checked
 * and *max_k receives the largest index + 1). */
ES_API const char* es_bsmm_validate(int64_t nnzb, int32_t block, int64_t n, int64_t k,
                                     const int32_t* k_index, const int32_t* row_ptr,
                                     int64_t row_ptr_len, int64_t* max_k);

/* Whole-operator single-threaded convenience calls (for test drivers). */
ES_API void es_bsmm_f32(const es_bsmm_args* a);
ES_API void es_bsconv_f32(const es_bsconv_args* a);
ES_API void es_gffn_f32(const es_gffn_args* a);
ES_API void es_dwconv_f32(const es_dwconv_args* a);

#ifdef __cplusplus
}
#endif

#endif
