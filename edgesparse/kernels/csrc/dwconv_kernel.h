// Depthwise NCHW convolution (one kh x kw filter per channel), fused bias and activation.
//
// Why a kernel of our own: in ONNX Runtime a depthwise conv runs fast only in its blocked NCHWc
// layout, so a depthwise conv between two of our (NCHW) sparse convs costs two layout reorders.
// This kernel keeps such a block in NCHW.
//
// Per channel: the input is rewritten into zero-padded phase planes (as BlockSparseConv does, see
// bsconv_kernel.h), which turns any stride/padding/dilation into contiguous, full-vector loads;
// then each output row is computed in vectors, each tap one broadcast weight times one unaligned
// load, with bias and activation, and stored straight into Y. The planes stay in L1.
#ifndef EDGESPARSE_DWCONV_KERNEL_H
#define EDGESPARSE_DWCONV_KERNEL_H

#include "bsconv_kernel.h"
#include "es_activation.h"
#include "es_kernels.h"
#include "es_simd.h"

namespace ES_NS {

struct DwGeom {
  int64_t hh, wh, ps, cs, q_total;  // ps: plane stride, hh * wh + a vector (the last row's spill)
  int64_t j0[4], j1[4];              // column phase pb < 4: plane columns [j0, j1) hold input columns
  int taps;
  int32_t toff[ES_CONV_MAX_TAPS];
};

// Plane columns [j0, j1) of column phase pb that hold input columns (j*sw + pb - pad_left in [0, w)).
static inline void dw_columns(const es_dwconv_args* a, int64_t wh, int64_t pb, int64_t* j0, int64_t* j1) {
  const int64_t sw = a->stride_w, off = pb - a->pad_left;
  int64_t lo = off < 0 ? (-off + sw - 1) / sw : 0;
  int64_t hi = a->w - off > 0 ? (a->w - off + sw - 1) / sw : 0;
  if (hi > wh) hi = wh;
  *j0 = lo > hi ? hi : lo;
  *j1 = hi;
}

static inline void dw_geom(const es_dwconv_args* a, DwGeom* g) {
  const int64_t sh = a->stride_h, sw = a->stride_w;
  g->hh = a->oh + ((a->kh - 1) * a->dil_h) / sh;
  g->wh = a->ow + ((a->kw - 1) * a->dil_w) / sw;
  g->ps = g->hh * g->wh + ES_VEC_FLOATS;
  g->cs = sh * sw * g->ps;
  g->q_total = a->oh * g->wh;
  g->taps = (int)(a->kh * a->kw);
  for (int64_t pb = 0; pb < 4; ++pb) dw_columns(a, g->wh, pb, &g->j0[pb], &g->j1[pb]);
  for (int64_t ky = 0; ky < a->kh; ++ky)
    for (int64_t kx = 0; kx < a->kw; ++kx) {
      const int64_t ry = ky * a->dil_h, rx = kx * a->dil_w;
      const int64_t plane = (ry % sh) * sw + (rx % sw);
      g->toff[ky * a->kw + kx] = (int32_t)(plane * g->ps + (ry / sh) * g->wh + rx / sw);
    }
}

// Scratch: one channel's phase planes, with slack for the last vector's over-read.
static int64_t dwconv_scratch(const es_dwconv_args* a) {
  DwGeom g;
  dw_geom(a, &g);
  return g.cs + 3 * ES_VEC_FLOATS;
}

// Phase planes of one channel (see bsconv_kernel.h). Written with explicit vectors: compilers turn
// plain copy/zero loops into memcpy/memset calls, whose per-call cost is several times the copy
// on 7-28 wide rows, and leave stride-2 gathers scalar (measured: 3-5x slower). Rows may be
// written past their end (into the next row, written after it, or the scratch slack).
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-loop-distribute-patterns")))  // keep the short zero loops inline
#endif
static void dw_planes(const es_dwconv_args* a, const DwGeom& g, const float* ES_RESTRICT xc, float* ES_RESTRICT pc) {
  constexpr int L = ES_VEC_FLOATS;
  const vfloat zero = vzero<vfloat>();
  const int64_t sh = a->stride_h, sw = a->stride_w, h = a->h, w = a->w, wh = g.wh;
  const int64_t plane_floats = g.ps;
  const float* limit = a->x + a->batch * a->channels * h * w;  // end of X: vector loads stay below
  vfloat lane;
  for (int k = 0; k < L; ++k) lane[k] = (float)k;
  for (int64_t i = 0; i < g.hh; ++i)
    for (int64_t pa = 0; pa < sh; ++pa) {
      const int64_t row = i * sh + pa - a->pad_top;
      float* first = pc + pa * sw * plane_floats + i * wh;  // plane (pa, 0), row i
      if (row < 0 || row >= h) {
        for (int64_t pb = 0; pb < sw; ++pb)
          for (int64_t j = 0; j < wh; j += L) vstore<vfloat>(first + pb * plane_floats + j, zero);
        continue;
      }
      const float* src_row = xc + row * w;
      // plane (pa, pb) column j = padded column j*sw + pb = input column j*sw + pb - pad_left
      const int64_t* j0 = g.j0;
      const int64_t* j1 = g.j1;
      if (sw == 2) {
        // both column phases at once: input columns 2j + pb - pad_left, deinterleaved in vectors
        float* d0 = first;
        float* d1 = first + plane_floats;
        for (int64_t j = 0; j < wh; j += L) {
          vstore<vfloat>(d0 + j, zero);
          vstore<vfloat>(d1 + j, zero);
        }
        const int64_t lo = j0[0] > j0[1] ? j0[0] : j0[1];
        const int64_t hi = j1[0] < j1[1] ? j1[0] : j1[1];
        int64_t j = lo;
        for (; j + L <= hi && 2 * (j + L) - a->pad_left <= w; j += L) {
          vfloat e, o;
          vdeinterleave(src_row + 2 * j - a->pad_left, e, o);
          vstore<vfloat>(d0 + j, e);
          vstore<vfloat>(d1 + j, o);
        }
        for (int64_t k = j < j0[0] ? j0[0] : j; k < j1[0]; ++k) d0[k] = src_row[2 * k - a->pad_left];
        for (int64_t k = j < j0[1] ? j0[1] : j; k < j1[1]; ++k) d1[k] = src_row[2 * k + 1 - a->pad_left];
        for (int64_t k = j0[0]; k < lo && k < j1[0]; ++k) d0[k] = src_row[2 * k - a->pad_left];
        for (int64_t k = j0[1]; k < lo && k < j1[1]; ++k) d1[k] = src_row[2 * k + 1 - a->pad_left];
        continue;
      }
      for (int64_t pb = 0; pb < sw; ++pb) {
        float* ES_RESTRICT dst = first + pb * plane_floats;
        const int64_t off = pb - a->pad_left;
        int64_t c0 = 0, c1 = 0;
        if (pb < 4)
          c0 = j0[pb], c1 = j1[pb];
        else
          dw_columns(a, wh, pb, &c0, &c1);
        const float* ES_RESTRICT src = src_row + off;
        for (int64_t j = 0; j < c0; j += L) vstore<vfloat>(dst + j, zero);
        if (sw == 1 && src + c0 + ((c1 - c0 + L - 1) / L) * L <= limit) {
          // whole vectors; the last one keeps its n valid lanes and zeroes the rest (the right
          // padding), its loads stay inside X (limit)
          int64_t j = c0;
          for (; j + L <= c1; j += L) vstore<vfloat>(dst + j, vload<vfloat>(src + j));
          if (j < c1) vstore<vfloat>(dst + j, vselect<vfloat>(lane < (float)(c1 - j), vload<vfloat>(src + j), zero));
          j += L;
          for (; j < wh; j += L) vstore<vfloat>(dst + j, zero);
          continue;
        }
        for (int64_t j = c0; j < c1; ++j) dst[j] = src[j * sw];
        for (int64_t j = c1; j < wh; j += L) vstore<vfloat>(dst + j, zero);
      }
    }
}

// One channel: y[i, j] = act(bias + sum_t w[t] * p[toff[t] + i*wh + j]). R output rows at a time,
// so that R independent FMA chains hide the FMA latency (one row at a time ran 4x slower: a 9-tap
// chain per vector). Columns go right to left: a row's last vector is stored whole and spills into
// the start of the next row, which is stored after it (same pass or the next one); only the
// channel's very last vector is stored partially. T > 0: tap count known at compile time (3x3).
template <int T, int ACT>
static void dw_channel(const es_dwconv_args* a, const DwGeom& g, const float* ES_RESTRICT p,
                       const float* ES_RESTRICT wc, float bias, float* ES_RESTRICT yc) {
  constexpr int L = ES_VEC_FLOATS, R = 4;
  const int taps = T > 0 ? T : g.taps;
  const int64_t oh = a->oh, ow = a->ow, wh = g.wh;
  float w[ES_CONV_MAX_TAPS];
  int32_t toff[ES_CONV_MAX_TAPS];
  for (int t = 0; t < taps; ++t) {
    w[t] = wc[t];
    toff[t] = g.toff[t];
  }
  const int64_t j_last = ((ow - 1) / L) * L;
  for (int64_t i = 0; i < oh; i += R) {
    const int rows = oh - i < R ? (int)(oh - i) : R;
    int64_t roff[R];
    for (int r = 0; r < R; ++r) roff[r] = (r < rows ? i + r : oh - 1) * wh;  // extra rows: recomputed, not stored
    for (int64_t j = j_last; j >= 0; j -= L) {
      vfloat acc[R];
      for (int r = 0; r < R; ++r) acc[r] = vset1<vfloat>(bias);
      for (int t = 0; t < taps; ++t) {
        const float* pt = p + toff[t] + j;
        for (int r = 0; r < R; ++r) acc[r] += vload<vfloat>(pt + roff[r]) * w[t];
      }
      for (int r = 0; r < rows; ++r) {
        const vfloat v = vactivate(acc[r], ACT);
        float* dst = yc + (i + r) * ow + j;
        if (j + L <= ow || i + r + 1 < oh)
          vstore<vfloat>(dst, v);
        else
          vstore_partial<vfloat>(dst, v, (int)(ow - j));
      }
    }
  }
}

template <int T, int ACT>
static void dw_channels(const es_dwconv_args* a, const DwGeom& g, float* scratch, int64_t n, int64_t c_begin,
                        int64_t c_end) {
  const int64_t oq = a->oh * a->ow;
  for (int64_t c = c_begin; c < c_end; ++c) {
    dw_planes(a, g, a->x + (n * a->channels + c) * a->h * a->w, scratch);
    const float bias = a->bias ? a->bias[c] : 0.0f;
    dw_channel<T, ACT>(a, g, scratch, a->weights + c * g.taps, bias, a->y + (n * a->channels + c) * oq);
  }
}

template <int T>
static void dw_channels_act(const es_dwconv_args* a, const DwGeom& g, float* scratch, int64_t n, int64_t c0,
                            int64_t c1) {
  switch (a->activation) {
    case ES_ACT_RELU: return dw_channels<T, ES_ACT_RELU>(a, g, scratch, n, c0, c1);
    case ES_ACT_RELU6: return dw_channels<T, ES_ACT_RELU6>(a, g, scratch, n, c0, c1);
    case ES_ACT_SILU: return dw_channels<T, ES_ACT_SILU>(a, g, scratch, n, c0, c1);
    case ES_ACT_GELU: return dw_channels<T, ES_ACT_GELU>(a, g, scratch, n, c0, c1);
    default: return dw_channels<T, ES_ACT_NONE>(a, g, scratch, n, c0, c1);
  }
}

// Image n, channels [c_begin, c_end).
static void dwconv_range(const es_dwconv_args* a, float* scratch, int64_t n, int64_t c_begin, int64_t c_end) {
  DwGeom g;
  dw_geom(a, &g);
  // Zero once: lanes past a row's end read plane gaps and slack; garbage there (denormals, NaN)
  // is dropped from the output but costs FP-assist stalls (measured 10x slower with malloc'ed
  // scratch).
  for (int64_t k = 0; k < g.cs + 2 * ES_VEC_FLOATS; k += ES_VEC_FLOATS) vstore<vfloat>(scratch + k, vzero<vfloat>());
  if (g.taps == 9)
    dw_channels_act<9>(a, g, scratch, n, c_begin, c_end);
  else
    dw_channels_act<0>(a, g, scratch, n, c_begin, c_end);
}

}  // namespace ES_NS

#endif
