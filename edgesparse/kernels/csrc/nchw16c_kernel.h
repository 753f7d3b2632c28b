// Kernels in the blocked NCHW16c layout: [N, C/16, H, W, 16], 16 channels interleaved at every
// pixel (ONNX Runtime's NCHWc layout on AVX-512).
//
// Why: in a MobileNet block `sparse 1x1 -> depthwise 3x3 -> sparse 1x1` ORT runs the depthwise conv
// in NCHWc and reorders to and from NCHW around it (87 us of a 790 us package on the sample CNN).
// With both convs in NCHW16c the tensors between them never change layout, and each kernel works on
// full, aligned vectors of 16 channels:
//
// - pointwise (1x1, stride 1) block-sparse conv, 16 x 1 blocks: a register tile holds 16 output
//   channels x P positions; per kept block (one input channel) one weight vector is loaded and the
//   input value of each position is broadcast. X may be NCHW or NCHW16c (the broadcast source only
//   moves), Y (and the residual) NCHW16c or NCHW (the tile is transposed on the store).
// - depthwise conv: per 16-channel block and output row, Q outputs at a time, each tap one vector
//   load times the tap's weight vector (no plane rewrite: blocked rows are already contiguous).
//
// Measured against the NCHW kernels on the sample CNN's layers (docs/kernels.md, "NCHW16c").
#ifndef EDGESPARSE_NCHW16C_KERNEL_H
#define EDGESPARSE_NCHW16C_KERNEL_H

#include "bsconv_kernel.h"  // ES_CONV_MAX_TAPS
#include "es_activation.h"
#include "es_kernels.h"
#include "es_simd.h"
#if defined(__AVX512F__) && !defined(__clang__)
#include <immintrin.h>  // masked stores of the transposed NCHW tile
#endif

namespace ES_NS {

#define ES_CB 16  // channels per block of the layout
constexpr int CB_R = ES_CB / ES_VEC_FLOATS;  // native vectors per 16 channels

#if ES_VEC_FLOATS == 16 && !defined(__clang__) && defined(__AVX512F__)
#define ES_HAVE_TRANSPOSE16 1
// In-register transpose of 16 vectors of 16 floats: at each level k the off-diagonal k x k blocks of
// rows i and i + k swap (4 levels x 16 two-input shuffles, against 256 scalar moves).
// Lane l of the new row i (i & K == 0) in the two-input shuffle of rows i and i + K (b = lanes 16..31).
constexpr int tr_lo(int l, int k) { return (l & k) ? 16 + l - k : l; }

// Constant masks (a mask built in a loop made GCC emit slow code).
template <int K>
ES_INLINE void vtranspose16_level(vfloat (&r)[16]) {
  typedef Vec<16>::itype I;
  constexpr I lo = {tr_lo(0, K),  tr_lo(1, K),  tr_lo(2, K),  tr_lo(3, K),  tr_lo(4, K),  tr_lo(5, K),
                    tr_lo(6, K),  tr_lo(7, K),  tr_lo(8, K),  tr_lo(9, K),  tr_lo(10, K), tr_lo(11, K),
                    tr_lo(12, K), tr_lo(13, K), tr_lo(14, K), tr_lo(15, K)};
  constexpr I hi = lo + K;  // new row i + K: (l & K) ? 16 + l : l + K
  for (int i = 0; i < 16; ++i) {
    if (i & K) continue;
    const vfloat a = r[i], b = r[i + K];
    r[i] = __builtin_shuffle(a, b, lo);
    r[i + K] = __builtin_shuffle(a, b, hi);
  }
}

ES_INLINE void vtranspose16(vfloat (&r)[16]) {
  vtranspose16_level<8>(r);
  vtranspose16_level<4>(r);
  vtranspose16_level<2>(r);
  vtranspose16_level<1>(r);
}
#endif

// Positions per register tile: P x CB_R accumulators plus the weight vectors.
constexpr int PW_P0 = (ES_NUM_VREGS - 2 * CB_R) / CB_R;
constexpr int PW_P = PW_P0 > 14 ? 14 : (PW_P0 < 1 ? 1 : PW_P0);

// Output block row j (16 channels), positions [q0, q0 + P) of image n.
template <int P, bool XB, bool YB, int ACT>
ES_INLINE void pw16_tile(const es_bsconv_args* a, int64_t n, int64_t q0, int64_t j) {
  const int64_t hw = a->h * a->w;
  const float* x = a->x + n * a->cin * hw;
  vfloat acc[P][CB_R];
  for (int i = 0; i < P; ++i)
    for (int r = 0; r < CB_R; ++r) acc[i][r] = vzero<vfloat>();
  for (int32_t p = a->row_ptr[j], pe = a->row_ptr[j + 1]; p < pe; ++p) {
    const int32_t k = a->c_index[p];
    const float* xk = XB ? x + (int64_t)(k / ES_CB) * hw * ES_CB + k % ES_CB + q0 * ES_CB : x + (int64_t)k * hw + q0;
    vfloat w[CB_R];
    for (int r = 0; r < CB_R; ++r) w[r] = vload<vfloat>(a->values + (int64_t)p * ES_CB + r * ES_VEC_FLOATS);
    for (int i = 0; i < P; ++i) {
      const float s = xk[i * (XB ? ES_CB : 1)];
      for (int r = 0; r < CB_R; ++r) acc[i][r] += w[r] * s;
    }
  }
  vfloat bias[CB_R];
  float bias_s[ES_CB];
  for (int c = 0; c < ES_CB; ++c) bias_s[c] = a->bias && j * ES_CB + c < a->cout ? a->bias[j * ES_CB + c] : 0.0f;
  for (int r = 0; r < CB_R; ++r) bias[r] = vload<vfloat>(bias_s + r * ES_VEC_FLOATS);
  const int64_t ybase = n * a->cout * hw;
  if (YB) {
    float* yo = a->y + ybase + (j * hw + q0) * ES_CB;
    const float* ro = a->residual ? a->residual + ybase + (j * hw + q0) * ES_CB : nullptr;
    for (int i = 0; i < P; ++i)
      for (int r = 0; r < CB_R; ++r) {
        vfloat v = vactivate(acc[i][r] + bias[r], ACT);
        if (ro) v += vload<vfloat>(ro + i * ES_CB + r * ES_VEC_FLOATS);
        vstore<vfloat>(yo + i * ES_CB + r * ES_VEC_FLOATS, v);
      }
  } else {  // NCHW: transpose the tile (16 channels x P positions)
    const int cn = a->cout - j * ES_CB < ES_CB ? (int)(a->cout - j * ES_CB) : ES_CB;
#ifdef ES_HAVE_TRANSPOSE16
    if (P > 1) {
      vfloat rows[16];
      for (int i = 0; i < 16; ++i)  // rows past P are zero (the index stays in bounds for the compiler)
        rows[i] = i < P ? vactivate(acc[i < P ? i : 0][0] + bias[0], ACT) : vzero<vfloat>();
      vtranspose16(rows);
      const __mmask16 m = (__mmask16)((1u << P) - 1);  // masked loads and stores: no spill past P
      for (int c = 0; c < cn; ++c) {
        float* yo = a->y + ybase + (j * ES_CB + c) * hw + q0;
        __m512 v = (__m512)rows[c];
        if (a->residual)
          v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, a->residual + ybase + (j * ES_CB + c) * hw + q0));
        _mm512_mask_storeu_ps(yo, m, v);
      }
      return;
    }
#endif
    float buf[P * ES_CB];
    for (int i = 0; i < P; ++i)
      for (int r = 0; r < CB_R; ++r)
        vstore<vfloat>(buf + i * ES_CB + r * ES_VEC_FLOATS, vactivate(acc[i][r] + bias[r], ACT));
    for (int c = 0; c < cn; ++c) {
      float* yo = a->y + ybase + (j * ES_CB + c) * hw + q0;
      const float* ro = a->residual ? a->residual + ybase + (j * ES_CB + c) * hw + q0 : nullptr;
      for (int i = 0; i < P; ++i) yo[i] = ro ? buf[i * ES_CB + c] + ro[i] : buf[i * ES_CB + c];
    }
  }
}

template <bool XB, bool YB, int ACT>
static void pw16_range_t(const es_bsconv_args* a, int64_t n, int64_t q_begin, int64_t q_end, int64_t j_begin,
                         int64_t j_end) {
  int64_t q = q_begin;
  // Positions outer, block rows inner: the input tile (P positions x all channels) stays in L1
  // while every block row reads it.
  for (; q + PW_P <= q_end; q += PW_P)
    for (int64_t j = j_begin; j < j_end; ++j) pw16_tile<PW_P, XB, YB, ACT>(a, n, q, j);
  // The rest in tiles of 7, 4, 2, 1 (a 7x7 image is 3 x 14 + 7: one position at a time is a single
  // FMA chain, latency-bound)
  constexpr int P7 = PW_P < 7 ? PW_P : 7, P4 = PW_P < 4 ? PW_P : 4, P2 = PW_P < 2 ? PW_P : 2;
  for (; q + P7 <= q_end; q += P7)
    for (int64_t j = j_begin; j < j_end; ++j) pw16_tile<P7, XB, YB, ACT>(a, n, q, j);
  for (; q + P4 <= q_end; q += P4)
    for (int64_t j = j_begin; j < j_end; ++j) pw16_tile<P4, XB, YB, ACT>(a, n, q, j);
  for (; q + P2 <= q_end; q += P2)
    for (int64_t j = j_begin; j < j_end; ++j) pw16_tile<P2, XB, YB, ACT>(a, n, q, j);
  for (; q < q_end; ++q)
    for (int64_t j = j_begin; j < j_end; ++j) pw16_tile<1, XB, YB, ACT>(a, n, q, j);
}

template <bool XB, bool YB>
static void pw16_range_layout(const es_bsconv_args* a, int64_t n, int64_t q0, int64_t q1, int64_t j0, int64_t j1) {
  switch (a->activation) {
    case ES_ACT_RELU: return pw16_range_t<XB, YB, ES_ACT_RELU>(a, n, q0, q1, j0, j1);
    case ES_ACT_RELU6: return pw16_range_t<XB, YB, ES_ACT_RELU6>(a, n, q0, q1, j0, j1);
    case ES_ACT_SILU: return pw16_range_t<XB, YB, ES_ACT_SILU>(a, n, q0, q1, j0, j1);
    case ES_ACT_GELU: return pw16_range_t<XB, YB, ES_ACT_GELU>(a, n, q0, q1, j0, j1);
    default: return pw16_range_t<XB, YB, ES_ACT_NONE>(a, n, q0, q1, j0, j1);
  }
}

// Image n, positions [q_begin, q_end) of h*w, block rows [j_begin, j_end). Contract (checked by the
// caller): 1x1 kernel, stride 1, no padding, block 16; x_block / y_block 16 need C / O multiples of 16.
static void bsconv16_range(const es_bsconv_args* a, int64_t n, int64_t q_begin, int64_t q_end, int64_t j_begin,
                           int64_t j_end) {
  const bool xb = a->x_block == ES_CB, yb = a->y_block == ES_CB;
  if (xb && yb) return pw16_range_layout<true, true>(a, n, q_begin, q_end, j_begin, j_end);
  if (xb) return pw16_range_layout<true, false>(a, n, q_begin, q_end, j_begin, j_end);
  if (yb) return pw16_range_layout<false, true>(a, n, q_begin, q_end, j_begin, j_end);
  return pw16_range_layout<false, false>(a, n, q_begin, q_end, j_begin, j_end);
}

// Depthwise geometry, copied out of the args so that the compiler keeps it in registers.
struct Dw16Geom {
  int64_t h, w, sh, sw, pt, pl, kh, kw, dh, dw;
};

// Depthwise: Q consecutive outputs of one row of one 16-channel block. K > 0: a K x K kernel
// without dilation known at compile time (3x3: the taps' weights stay in registers).
template <int Q, int K, int ACT>
ES_INLINE void dw16_outputs(const Dw16Geom& g, const float* xc, const vfloat (*w)[CB_R], const vfloat* bias,
                            int64_t oh, int64_t ow0, float* yrow) {
  vfloat acc[Q][CB_R];
  for (int q = 0; q < Q; ++q)
    for (int r = 0; r < CB_R; ++r) acc[q][r] = bias[r];
  const int64_t sw = g.sw, kh = K ? K : g.kh, kw = K ? K : g.kw, dh = K ? 1 : g.dh, dw = K ? 1 : g.dw;
  for (int64_t ky = 0; ky < kh; ++ky) {
    const int64_t ih = oh * g.sh - g.pt + ky * dh;
    if (ih < 0 || ih >= g.h) continue;
    const float* row = xc + ih * g.w * ES_CB;
    for (int64_t kx = 0; kx < kw; ++kx) {
      const int64_t iw0 = ow0 * sw - g.pl + kx * dw;
      const vfloat* wv = w[ky * kw + kx];
      if (iw0 >= 0 && iw0 + (Q - 1) * sw < g.w) {
        for (int q = 0; q < Q; ++q)
          for (int r = 0; r < CB_R; ++r)
            acc[q][r] += vload<vfloat>(row + (iw0 + q * sw) * ES_CB + r * ES_VEC_FLOATS) * wv[r];
      } else {  // a border: skip the taps in the padding
        for (int q = 0; q < Q; ++q) {
          const int64_t iw = iw0 + q * sw;
          if (iw < 0 || iw >= g.w) continue;
          for (int r = 0; r < CB_R; ++r) acc[q][r] += vload<vfloat>(row + iw * ES_CB + r * ES_VEC_FLOATS) * wv[r];
        }
      }
    }
  }
  for (int q = 0; q < Q; ++q)
    for (int r = 0; r < CB_R; ++r)
      vstore<vfloat>(yrow + (ow0 + q) * ES_CB + r * ES_VEC_FLOATS, vactivate(acc[q][r], ACT));
}

template <int Q, int K, int ACT>
static void dw16_blocks(const es_dwconv_args* a, int64_t n, int64_t cb_begin, int64_t cb_end) {
  const int64_t cbs = a->channels / ES_CB, taps = a->kh * a->kw, oh_n = a->oh, ow_n = a->ow;
  const Dw16Geom g = {a->h, a->w, a->stride_h, a->stride_w, a->pad_top, a->pad_left, a->kh, a->kw, a->dil_h, a->dil_w};
  for (int64_t cb = cb_begin; cb < cb_end; ++cb) {
    vfloat w[K ? K * K : ES_CONV_MAX_TAPS][CB_R], bias[CB_R];
    // weights [C, kh*kw] -> per tap, 16 channels
    for (int64_t t = 0; t < taps; ++t) {
      float tmp[ES_CB];
      for (int c = 0; c < ES_CB; ++c) tmp[c] = a->weights[(cb * ES_CB + c) * taps + t];
      for (int r = 0; r < CB_R; ++r) w[t][r] = vload<vfloat>(tmp + r * ES_VEC_FLOATS);
    }
    float bs[ES_CB];
    for (int c = 0; c < ES_CB; ++c) bs[c] = a->bias ? a->bias[cb * ES_CB + c] : 0.0f;
    for (int r = 0; r < CB_R; ++r) bias[r] = vload<vfloat>(bs + r * ES_VEC_FLOATS);
    const float* xc = a->x + (n * cbs + cb) * g.h * g.w * ES_CB;
    float* yc = a->y + (n * cbs + cb) * oh_n * ow_n * ES_CB;
    for (int64_t oh = 0; oh < oh_n; ++oh) {
      float* yrow = yc + oh * ow_n * ES_CB;
      int64_t ow = 0;
      for (; ow + Q <= ow_n; ow += Q) dw16_outputs<Q, K, ACT>(g, xc, w, bias, oh, ow, yrow);
      for (; ow < ow_n; ++ow) dw16_outputs<1, K, ACT>(g, xc, w, bias, oh, ow, yrow);
    }
  }
}

// Outputs per step: 7 divides the 28/14/7-wide rows of MobileNets on 28x28 inputs (measured 20 %
// faster than 4 at 28x28); 8 otherwise. Fewer where registers are short (CB_R vectors per output).
template <int K, int ACT>
static void dw16_blocks_q(const es_dwconv_args* a, int64_t n, int64_t cb0, int64_t cb1) {
  if (CB_R > 2) return dw16_blocks<3, K, ACT>(a, n, cb0, cb1);
  if (CB_R > 1) return dw16_blocks<4, K, ACT>(a, n, cb0, cb1);
  if (a->ow % 7 == 0) return dw16_blocks<7, K, ACT>(a, n, cb0, cb1);
  return dw16_blocks<8, K, ACT>(a, n, cb0, cb1);
}

template <int ACT>
static void dw16_blocks_k(const es_dwconv_args* a, int64_t n, int64_t cb0, int64_t cb1) {
  if (a->kh == 3 && a->kw == 3 && a->dil_h == 1 && a->dil_w == 1) return dw16_blocks_q<3, ACT>(a, n, cb0, cb1);
  return dw16_blocks_q<0, ACT>(a, n, cb0, cb1);
}

// Image n, 16-channel blocks [cb_begin, cb_end). Contract: channels a multiple of 16, X and Y
// NCHW16c ([N, C/16, H, W, 16] and [N, C/16, OH, OW, 16]).
static void dwconv16_range(const es_dwconv_args* a, int64_t n, int64_t cb_begin, int64_t cb_end) {
  switch (a->activation) {
    case ES_ACT_RELU: return dw16_blocks_k<ES_ACT_RELU>(a, n, cb_begin, cb_end);
    case ES_ACT_RELU6: return dw16_blocks_k<ES_ACT_RELU6>(a, n, cb_begin, cb_end);
    case ES_ACT_SILU: return dw16_blocks_k<ES_ACT_SILU>(a, n, cb_begin, cb_end);
    case ES_ACT_GELU: return dw16_blocks_k<ES_ACT_GELU>(a, n, cb_begin, cb_end);
    default: return dw16_blocks_k<ES_ACT_NONE>(a, n, cb_begin, cb_end);
  }
}

}  // namespace ES_NS

#endif
