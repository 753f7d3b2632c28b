// Block-sparse NCHW convolution (groups of B output channels x 1 input
// channel x all kh*kw taps), fused bias and activation.
//
// Vectorised over output positions, which are contiguous in NCHW: a register
// tile holds BC output channels x S vectors of positions; every weight is
// broadcast once per tile and every input vector is reused by BC channels.
//
// Any stride/padding/dilation is reduced to a stride-1 problem: the input of
// one image is rewritten once into zero-padded "phase planes",
//   P[c][a][b][i][j] = Xpadded[c][i*sh + a][j*sw + b],
// so that for tap (ky, kx) the inputs of consecutive output positions are
// consecutive floats at a fixed offset. Output positions are enumerated on a
// virtual grid of OH x Wh (Wh >= OW; the extra columns are computed and
// dropped), which keeps vectors full even for narrow images. Only input
// channels that some block uses are rewritten. A 1x1 stride-1 unpadded
// convolution reads X directly (no rewrite).
#ifndef EDGESPARSE_BSCONV_KERNEL_H
#define EDGESPARSE_BSCONV_KERNEL_H

#include "es_activation.h"
#include "es_kernels.h"
#include "es_simd.h"

namespace ES_NS {

#define ES_CONV_MAX_TAPS 256

// Register tile: BC channels per pass (B or half of it), S position vectors.
template <int B>
struct ConvTile {
  static constexpr int BC = (B + 3 <= ES_NUM_VREGS) ? B : ES_NUM_VREGS / 2;
  static constexpr int S0 = (ES_NUM_VREGS - 2) / (BC + 1);
  static constexpr int S = S0 > 4 ? 4 : (S0 < 1 ? 1 : S0);
  static constexpr int POS = S * ES_VEC_FLOATS;  // positions per tile
};

static inline int32_t bsconv_tile(int32_t block) {
  return block == 4 ? ConvTile<4>::POS : block == 8 ? ConvTile<8>::POS : ConvTile<16>::POS;
}

struct ConvGeom {
  int64_t hh, wh;    // phase-plane height/width (virtual output grid is oh x wh)
  int64_t cs;        // floats per input channel in the prepared input
  int64_t q_total;   // virtual positions: oh * wh
  int taps;
  bool direct;       // 1x1, stride 1, no padding: X is used as is
  int32_t toff[ES_CONV_MAX_TAPS];
};

static inline void conv_geom(const es_bsconv_args* a, ConvGeom* g) {
  const int64_t sh = a->stride_h, sw = a->stride_w;
  g->direct = a->kh == 1 && a->kw == 1 && sh == 1 && sw == 1 && a->pad_top == 0 && a->pad_left == 0 &&
              a->oh == a->h && a->ow == a->w;
  g->hh = a->oh + ((a->kh - 1) * a->dil_h) / sh;
  g->wh = a->ow + ((a->kw - 1) * a->dil_w) / sw;
  if (g->direct) {
    g->hh = a->h;
    g->wh = a->w;
  }
  g->cs = sh * sw * g->hh * g->wh;
  g->q_total = a->oh * g->wh;
  g->taps = (int)(a->kh * a->kw);
  for (int64_t ky = 0; ky < a->kh; ++ky)
    for (int64_t kx = 0; kx < a->kw; ++kx) {
      const int64_t ry = ky * a->dil_h, rx = kx * a->dil_w;
      const int64_t plane = (ry % sh) * sw + (rx % sw);
      g->toff[ky * a->kw + kx] = (int32_t)(plane * g->hh * g->wh + (ry / sh) * g->wh + rx / sw);
    }
}

// Floats of prepared input per image (0 when X is used directly), with slack
// for the over-reading last tile.
static int64_t bsconv_prepared_floats(const es_bsconv_args* a) {
  ConvGeom g;
  conv_geom(a, &g);
  if (g.direct) return 0;
  return a->cin * g.cs + g.wh + 4 * ES_VEC_FLOATS * 4 + 64;
}

// One channel xc [h, w] rewritten into sh * sw zero-padded phase planes of hh x wh:
// plane (pa, pb) row i, column j = Xpadded[i*sh + pa][j*sw + pb].
static inline void phase_planes(const float* xc, int64_t h, int64_t w, int64_t sh, int64_t sw, int64_t pad_top,
                                int64_t pad_left, int64_t hh, int64_t wh, float* pc) {
  for (int64_t pa = 0; pa < sh; ++pa)
    for (int64_t pb = 0; pb < sw; ++pb) {
      float* plane = pc + (pa * sw + pb) * hh * wh;
      for (int64_t i = 0; i < hh; ++i) {
        float* dst = plane + i * wh;
        const int64_t row = i * sh + pa - pad_top;
        if (row < 0 || row >= h) {
          memset(dst, 0, sizeof(float) * (size_t)wh);
          continue;
        }
        const float* src = xc + row * w;
        // columns j with 0 <= j*sw + pb - pad_left < w
        int64_t j0 = 0, j1 = wh;
        const int64_t off = pb - pad_left;
        while (j0 < j1 && j0 * sw + off < 0) ++j0;
        while (j1 > j0 && (j1 - 1) * sw + off >= w) --j1;
        if (j0 > 0) memset(dst, 0, sizeof(float) * (size_t)j0);
        if (sw == 1) {
          if (j1 > j0) memcpy(dst + j0, src + j0 + off, sizeof(float) * (size_t)(j1 - j0));
        } else {
          for (int64_t j = j0; j < j1; ++j) dst[j] = src[j * sw + off];
        }
        if (j1 < wh) memset(dst + j1, 0, sizeof(float) * (size_t)(wh - j1));
      }
    }
}

// Rewrites channels [c_begin, c_end) of image n into phase planes (channels
// with used[c] == 0 are skipped; used may be NULL).
static void bsconv_prepare(const es_bsconv_args* a, float* prep, int64_t n, int64_t c_begin, int64_t c_end,
                           const uint8_t* used) {
  ConvGeom g;
  conv_geom(a, &g);
  if (g.direct) return;
  const int64_t sh = a->stride_h, sw = a->stride_w, h = a->h, w = a->w;
  for (int64_t c = c_begin; c < c_end; ++c) {
    if (used && !used[c]) continue;
    phase_planes(a->x + (n * a->cin + c) * h * w, h, w, sh, sw, a->pad_top, a->pad_left, g.hh, g.wh, prep + c * g.cs);
  }
  // slack read by the last (partial) tile
  if (c_end == a->cin) memset(prep + a->cin * g.cs, 0, sizeof(float) * (size_t)(g.wh + 4 * ES_VEC_FLOATS * 4 + 64));
}

// acc[b][s] = sum over blocks p and taps t of values[p, t, bc0 + b] * x[c_index[p]][toff[t] + s*L]
// nvalid < S*L: partial loads (direct mode, last tile only).
template <int B, int BC, int S, bool PARTIAL>
ES_INLINE void conv_accumulate(const float* ES_RESTRICT xq, int64_t cs, const ConvGeom& g,
                               const float* ES_RESTRICT vals, const int32_t* ES_RESTRICT cidx, int32_t p0,
                               int32_t p1, int bc0, int nvalid, vfloat (&out)[BC][S]) {
  constexpr int L = ES_VEC_FLOATS;
  // Local accumulators (copied out once): GCC keeps them in registers only
  // when they do not live behind the caller's reference.
  vfloat acc[BC][S];
  for (int b = 0; b < BC; ++b)
    for (int s = 0; s < S; ++s) acc[b][s] = vzero<vfloat>();
  const int taps = g.taps;
  int32_t toff[ES_CONV_MAX_TAPS];
  for (int t = 0; t < taps; ++t) toff[t] = g.toff[t];
  for (int32_t p = p0; p < p1; ++p) {
    const float* xc = xq + (int64_t)cidx[p] * cs;
    const float* w = vals + (int64_t)p * taps * B + bc0;
    for (int t = 0; t < taps; ++t) {
      const float* xt = xc + toff[t];
      vfloat xv[S];
      for (int s = 0; s < S; ++s) {
        if (PARTIAL) {
          int cnt = nvalid - s * L;
          cnt = cnt < 0 ? 0 : (cnt > L ? L : cnt);
          xv[s] = cnt == L ? vload<vfloat>(xt + s * L) : vload_partial<vfloat>(xt + s * L, cnt);
        } else {
          xv[s] = vload<vfloat>(xt + s * L);
        }
      }
      const float* wt = w + t * B;
      for (int b = 0; b < BC; ++b) {
        const float wb = wt[b];
        for (int s = 0; s < S; ++s) acc[b][s] += xv[s] * wb;
      }
    }
  }
  for (int b = 0; b < BC; ++b)
    for (int s = 0; s < S; ++s) out[b][s] = acc[b][s];
}

// Block rows [jb, je), virtual positions [q0, q0 + tile) clipped to q_end;
// positions below `keep_from` are computed but not stored (overlapped tile).
// ACT: the activation as a template argument, so the epilogue has no switch per vector (measured:
// the epilogue is a third of the instructions of a 64-channel 1x1 layer at 70 %).
template <int B, int ACT>
static void bsconv_tile_rows(const es_bsconv_args* a, const ConvGeom& g, const float* xin, int64_t n, int64_t q0,
                             int64_t q_end, int64_t keep_from, int64_t jb, int64_t je) {
  typedef ConvTile<B> CT;
  constexpr int BC = CT::BC, S = CT::S, L = ES_VEC_FLOATS, POS = CT::POS;
  const int64_t tile_end = q0 + POS < q_end ? q0 + POS : q_end;
  const int nq = (int)(tile_end - q0);
  const int skip = (int)(keep_from - q0);  // leading positions already stored
  const bool partial = g.direct && q0 + POS > g.q_total;  // would read past X (tiny images only)
  const int64_t oq = a->oh * a->ow;
  const bool contiguous = g.wh == a->ow && skip == 0;  // virtual grid == output grid
  float* ybase = a->y + n * a->cout * oq;
  for (int64_t j = jb; j < je; ++j) {
    const int32_t p0 = a->row_ptr[j], p1 = a->row_ptr[j + 1];
    for (int bc0 = 0; bc0 < B; bc0 += BC) {
      const int64_t o0 = j * B + bc0;
      if (o0 >= a->cout) break;
      vfloat acc[BC][S];
      if (partial)
        conv_accumulate<B, BC, S, true>(xin + q0, g.cs, g, a->values, a->c_index, p0, p1, bc0, nq, acc);
      else
        conv_accumulate<B, BC, S, false>(xin + q0, g.cs, g, a->values, a->c_index, p0, p1, bc0, nq, acc);
      for (int b = 0; b < BC; ++b) {
        const int64_t o = o0 + b;
        if (o >= a->cout) break;
        const float bias = a->bias ? a->bias[o] : 0.0f;
        float* yo = ybase + o * oq;
        // residual (same shape as Y) is added after the activation, like the Add that follows a conv
        const float* ro = a->residual ? a->residual + (ybase - a->y) + o * oq : nullptr;
        if (contiguous) {
          for (int s = 0; s < S; ++s) {
            const int cnt = nq - s * L;
            if (cnt <= 0) break;
            vfloat v = vactivate(acc[b][s] + bias, ACT);
            if (cnt >= L) {
              if (ro) v += vload<vfloat>(ro + q0 + s * L);
              vstore<vfloat>(yo + q0 + s * L, v);
            } else {
              if (ro) v += vload_partial<vfloat>(ro + q0 + s * L, cnt);
              vstore_partial<vfloat>(yo + q0 + s * L, v, cnt);
            }
          }
        } else {
          float buf[POS];
          for (int s = 0; s < S; ++s) vstore<vfloat>(buf + s * L, vactivate(acc[b][s] + bias, ACT));
          const int64_t qs = q0 + skip;
          int64_t row = qs / g.wh, col = qs % g.wh;
          for (int i = skip; i < nq; ++i) {
            if (col < a->ow) yo[row * a->ow + col] = ro ? buf[i] + ro[row * a->ow + col] : buf[i];
            if (++col == g.wh) {
              col = 0;
              ++row;
            }
          }
        }
      }
    }
  }
}

typedef void (*bsconv_tile_rows_fn)(const es_bsconv_args*, const ConvGeom&, const float*, int64_t, int64_t, int64_t,
                                    int64_t, int64_t, int64_t);

template <int B>
static bsconv_tile_rows_fn bsconv_tile_fn_act(int act) {
  switch (act) {
    case ES_ACT_RELU: return bsconv_tile_rows<B, ES_ACT_RELU>;
    case ES_ACT_RELU6: return bsconv_tile_rows<B, ES_ACT_RELU6>;
    case ES_ACT_SILU: return bsconv_tile_rows<B, ES_ACT_SILU>;
    case ES_ACT_GELU: return bsconv_tile_rows<B, ES_ACT_GELU>;
    default: return bsconv_tile_rows<B, ES_ACT_NONE>;
  }
}

static bsconv_tile_rows_fn bsconv_tile_fn(int32_t block, int act) {
  return block == 4 ? bsconv_tile_fn_act<4>(act) : block == 8 ? bsconv_tile_fn_act<8>(act) : bsconv_tile_fn_act<16>(act);
}

// Weights of the block rows processed together over all position tiles.
#ifndef ES_CONV_GROUP_BYTES
#define ES_CONV_GROUP_BYTES (128 * 1024)
#endif

// Image n, virtual positions [q_begin, q_end) (multiples of the tile except at
// the end), block rows [j_begin, j_end). prep: bsconv_prepare's output for
// image n (ignored in direct mode).
static void bsconv_range(const es_bsconv_args* a, const float* prep, int64_t n, int64_t q_begin, int64_t q_end,
                         int64_t j_begin, int64_t j_end) {
  ConvGeom g;
  conv_geom(a, &g);
  const float* xin = g.direct ? a->x + n * a->cin * a->h * a->w : prep;
  if (q_end > g.q_total) q_end = g.q_total;
  const int64_t pos = bsconv_tile(a->block);
  void (*tile_rows)(const es_bsconv_args*, const ConvGeom&, const float*, int64_t, int64_t, int64_t, int64_t,
                    int64_t, int64_t) =
      bsconv_tile_fn(a->block, a->activation);
  const int64_t block_bytes = g.taps * a->block * (int64_t)sizeof(float);
  const int64_t group_blocks = ES_CONV_GROUP_BYTES / block_bytes > 0 ? ES_CONV_GROUP_BYTES / block_bytes : 1;
  for (int64_t j0 = j_begin; j0 < j_end;) {
    int64_t j1 = j0 + 1;
    while (j1 < j_end && a->row_ptr[j1 + 1] - a->row_ptr[j0] <= group_blocks) ++j1;
    for (int64_t q0 = q_begin; q0 < q_end; q0 += pos) {
      // In direct mode a last partial tile is shifted back to end at q_total
      // (overlapping the previous one) so that all its loads stay inside X.
      if (g.direct && q0 + pos > g.q_total && g.q_total >= pos)
        tile_rows(a, g, xin, n, g.q_total - pos, g.q_total, q0, j0, j1);
      else
        tile_rows(a, g, xin, n, q0, q_end, q0, j0, j1);
    }
    j0 = j1;
  }
}

static int64_t bsconv_positions(const es_bsconv_args* a) {
  ConvGeom g;
  conv_geom(a, &g);
  return g.q_total;
}

}  // namespace ES_NS

#endif
