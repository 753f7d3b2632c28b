// Gathered FFN (activation sparsity): only the active experts (blocks of S
// intermediate neurons) of the up/gate projections and the matching rows of
// the down projection are computed for a chunk of tokens.
//
// Phase 1 (gffn_up): per token tile and active expert, dense [T x D] x [D x S]
// panels with the bsmm register tile (outputs vectorised, inputs broadcast
// from the packed X); the activated h is stored transposed, h[(i*S + s)][t],
// so that phase 2 can broadcast it the same way.
// Phase 2 (gffn_down): per token tile and panel of output columns, the sum
// over active experts of h_e @ w_down[e] (rows of one expert are contiguous).
#ifndef EDGESPARSE_GFFN_KERNEL_H
#define EDGESPARSE_GFFN_KERNEL_H

#include "bsmm_kernel.h"
#include "es_activation.h"
#include "es_kernels.h"
#include "es_simd.h"

namespace ES_NS {

static inline int32_t gffn_tile_m() { return BsmmTile<16>::T; }

// acc[t][r] += sum_{d < count} w[d * wstride + r*L ...] * xt[d * ldx + t]
template <int P, int T>
ES_INLINE void dense_accumulate(const float* ES_RESTRICT xt, int64_t ldx, const float* ES_RESTRICT w,
                                int64_t wstride, int64_t count, typename Lanes<P>::V (&acc)[T][Lanes<P>::R]) {
  typedef typename Lanes<P>::V V;
  constexpr int L = Lanes<P>::L, R = Lanes<P>::R;
  constexpr int U = T * R >= 4 ? 1 : (T * R == 1 ? 4 : 2);
  V part[U][T][R];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) part[u][t][r] = vzero<V>();
  // One token (decode): this loop streams weights that are cold, since a step reads each
  // layer's weights once; prefetch ~2 KB ahead, across the page boundaries where the hardware
  // prefetchers stop (harmless past the block's end).
  const int64_t ahead = T == 1 ? (2048 / (4 * wstride) + 1) * wstride : 0;
  int64_t d = 0;
  for (; d + U <= count; d += U)
    for (int u = 0; u < U; ++u) {
      const float* xp = xt + (d + u) * ldx;
      const float* wp = w + (d + u) * wstride;
      if constexpr (T == 1)
        for (int r = 0; r < R; ++r) __builtin_prefetch(wp + ahead + r * L);
      for (int r = 0; r < R; ++r) {
        V wv = vload<V>(wp + r * L);
        for (int t = 0; t < T; ++t) part[u][t][r] += wv * xp[t];
      }
    }
  for (; d < count; ++d) {
    const float* xp = xt + d * ldx;
    const float* wp = w + d * wstride;
    for (int r = 0; r < R; ++r) {
      V wv = vload<V>(wp + r * L);
      for (int t = 0; t < T; ++t) part[0][t][r] += wv * xp[t];
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) {
      V s = acc[t][r];
      for (int u = 0; u < U; ++u) s += part[u][t][r];
      acc[t][r] = s;
    }
}

// One panel of P intermediate neurons [c0, c0+P) of active expert i for the T
// tokens of a tile: h = act(gate) * up (or act(up)), times the token's scale of expert e when
// scales are given (sc: the tile's first row of scales), stored as h[(i*S + s)*T + t].
template <int P, int T>
static void gffn_up_panel(const es_gffn_args* a, const float* xt, float* h, int64_t i, int64_t c0,
                          const float* sc) {
  typedef typename Lanes<P>::V V;
  constexpr int L = Lanes<P>::L, R = Lanes<P>::R;
  const int64_t d = a->d, s = a->s, e = a->experts[i];
  V up[T][R], gate[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) up[t][r] = gate[t][r] = vzero<V>();
  dense_accumulate<P, T>(xt, T, a->w_up + e * d * s + c0, s, d, up);
  if (a->w_gate) dense_accumulate<P, T>(xt, T, a->w_gate + e * d * s + c0, s, d, gate);
  float buf[T][P];
  for (int r = 0; r < R; ++r) {
    const V bu = a->b_up ? vload<V>(a->b_up + e * s + c0 + r * L) : vzero<V>();
    const V bg = a->b_gate ? vload<V>(a->b_gate + e * s + c0 + r * L) : vzero<V>();
    for (int t = 0; t < T; ++t) {
      V u = up[t][r] + bu;
      V hv = a->w_gate ? vactivate(gate[t][r] + bg, a->activation) * u : vactivate(u, a->activation);
      if (sc) hv = hv * sc[t * a->e_total + e];
      vstore<V>(&buf[t][r * L], hv);
    }
  }
  float* dst = h + (i * s + c0) * T;
  for (int l = 0; l < P; ++l)
    for (int t = 0; t < T; ++t) dst[l * T + t] = buf[t][l];
}

// One token (decode): the active experts' weights are cold (a step reads each layer's weights
// once) and only known once the router has run. When they fit well inside L2, ask for all of them
// up front, up blocks first: the memory system then fetches at full parallelism while the up
// products start, instead of one short stream per expert block, each starting with a miss.
static inline void prefetch_active(const es_gffn_args* a, int64_t i_begin, int64_t i_end) {
  const int64_t up = a->d * a->s, down = a->s * a->d_out;
  if ((i_end - i_begin) * (up * (a->w_gate ? 2 : 1) + down) > (int64_t)128 * 1024) return;  // > 512 KB
  for (int64_t i = i_begin; i < i_end; ++i)
    for (int64_t k = 0; k < up; k += 16) {
      __builtin_prefetch(a->w_up + a->experts[i] * up + k);
      if (a->w_gate) __builtin_prefetch(a->w_gate + a->experts[i] * up + k);
    }
  for (int64_t i = i_begin; i < i_end; ++i)
    for (int64_t k = 0; k < down; k += 16) __builtin_prefetch(a->w_down + a->experts[i] * down + k);
}

template <int T>
static void gffn_up_tile(const es_gffn_args* a, const float* xt, float* h, int64_t i_begin, int64_t i_end,
                         const float* sc) {
  if constexpr (T == 1) prefetch_active(a, i_begin, i_end);
  for (int64_t i = i_begin; i < i_end; ++i) {
    int64_t c0 = 0;
    // One token (decode): 32 neurons per pass read each weight row's 128 bytes at once, so an
    // expert streams through its [D, S] block once instead of twice at half a cache line.
    if constexpr (T == 1)
      for (; c0 + 32 <= a->s; c0 += 32) gffn_up_panel<32, 1>(a, xt, h, i, c0, sc);
    for (; c0 + 16 <= a->s; c0 += 16) gffn_up_panel<16, T>(a, xt, h, i, c0, sc);
    if (c0 + 8 <= a->s) {
      gffn_up_panel<8, T>(a, xt, h, i, c0, sc);
      c0 += 8;
    }
    if (c0 + 4 <= a->s) gffn_up_panel<4, T>(a, xt, h, i, c0, sc);
  }
}

// Output columns [n0, n0+P) for the T tokens of a tile starting at token t0.
template <int P, int T>
static void gffn_down_panel(const es_gffn_args* a, const float* ht, int64_t t0, int64_t n0) {
  typedef typename Lanes<P>::V V;
  constexpr int L = Lanes<P>::L, R = Lanes<P>::R;
  const int64_t s = a->s, dout = a->d_out;
  V acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = a->b_down ? vload<V>(a->b_down + n0 + r * L) : vzero<V>();
  for (int64_t i = 0; i < a->n_active; ++i) {
    const int64_t e = a->experts[i];
    dense_accumulate<P, T>(ht + i * s * T, T, a->w_down + e * s * dout + n0, dout, s, acc);
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) vstore<V>(a->y + (t0 + t) * dout + n0 + r * L, acc[t][r]);
}

// Output columns per panel for one token: half the vector registers as accumulators. A decode
// step's down projection then reads each active row of w_down in long contiguous runs (the
// whole row at D = 256 on AVX-512) instead of 64 bytes per row per 16-column panel, which
// strides through the expert 1 KB at a time: the weights of a decode step come from L3 or DRAM,
// where that stride costs latency the prefetchers do not hide.
constexpr int GFFN_WIDE = ES_NUM_VREGS / 2 * ES_VEC_FLOATS;

template <int T>
static void gffn_down_tile(const es_gffn_args* a, const float* ht, int64_t t0, int64_t n_begin, int64_t n_end) {
  int64_t n0 = n_begin;
  if constexpr (T == 1)
    for (; n0 + GFFN_WIDE <= n_end; n0 += GFFN_WIDE) gffn_down_panel<GFFN_WIDE, 1>(a, ht, t0, n0);
  for (; n0 + 16 <= n_end; n0 += 16) gffn_down_panel<16, T>(a, ht, t0, n0);
  if (n0 + 8 <= n_end) {
    gffn_down_panel<8, T>(a, ht, t0, n0);
    n0 += 8;
  }
  if (n0 + 4 <= n_end) gffn_down_panel<4, T>(a, ht, t0, n0);
}

#define ES_GFFN_SWITCH(fn, tc, ...)                          \
  switch (tc) {                                              \
    case 1: fn<1>(__VA_ARGS__); break;                       \
    case 2: if constexpr (2 <= BsmmTile<16>::T) fn<(2 <= BsmmTile<16>::T ? 2 : 1)>(__VA_ARGS__); break; \
    case 3: if constexpr (3 <= BsmmTile<16>::T) fn<(3 <= BsmmTile<16>::T ? 3 : 1)>(__VA_ARGS__); break; \
    case 4: if constexpr (4 <= BsmmTile<16>::T) fn<(4 <= BsmmTile<16>::T ? 4 : 1)>(__VA_ARGS__); break; \
    case 5: if constexpr (5 <= BsmmTile<16>::T) fn<(5 <= BsmmTile<16>::T ? 5 : 1)>(__VA_ARGS__); break; \
    case 6: if constexpr (6 <= BsmmTile<16>::T) fn<(6 <= BsmmTile<16>::T ? 6 : 1)>(__VA_ARGS__); break; \
    case 7: if constexpr (7 <= BsmmTile<16>::T) fn<(7 <= BsmmTile<16>::T ? 7 : 1)>(__VA_ARGS__); break; \
    case 8: if constexpr (8 <= BsmmTile<16>::T) fn<(8 <= BsmmTile<16>::T ? 8 : 1)>(__VA_ARGS__); break; \
    default: break;                                          \
  }

// Scratch layout (floats): packed x [t][d] by tiles, then (from a 64-byte
// boundary) h [t][n_active * s] by tiles.
static inline int64_t gffn_h_offset(const es_gffn_args* a) { return (a->t * a->d + 15) / 16 * 16; }
static int64_t gffn_scratch(const es_gffn_args* a) { return gffn_h_offset(a) + a->t * a->n_active * a->s + 16; }

static inline float* gffn_h(const es_gffn_args* a, float* scratch) { return scratch + gffn_h_offset(a); }

// Packs tokens [t_begin, t_end) (tile aligned) of x into scratch as [d][tc] tiles.
static void gffn_pack(const es_gffn_args* a, float* scratch, int64_t t_begin, int64_t t_end) {
  const int64_t tm = gffn_tile_m(), d = a->d;
  for (int64_t t0 = t_begin; t0 < t_end; t0 += tm) {
    const int64_t tc = a->t - t0 < tm ? a->t - t0 : tm;
    pack_token_tile(a->x + t0 * d, d, tc, scratch + t0 * d);
  }
}

// Phase 1 for token tiles in [t_begin, t_end) and active experts [i_begin, i_end).
static void gffn_up(const es_gffn_args* a, float* scratch, int64_t t_begin, int64_t t_end, int64_t i_begin,
                    int64_t i_end) {
  const int64_t tm = gffn_tile_m(), hs = a->n_active * a->s;
  float* h = gffn_h(a, scratch);
  for (int64_t t0 = t_begin; t0 < t_end; t0 += tm) {
    const int tc = (int)(a->t - t0 < tm ? a->t - t0 : tm);
    const float* xt = scratch + t0 * a->d;
    float* ht = h + t0 * hs;
    const float* sc = a->scales ? a->scales + t0 * a->e_total : nullptr;
    ES_GFFN_SWITCH(gffn_up_tile, tc, a, xt, ht, i_begin, i_end, sc)
  }
}

// Phase 2 for token tiles in [t_begin, t_end) and output columns [n_begin, n_end).
static void gffn_down(const es_gffn_args* a, const float* scratch, int64_t t_begin, int64_t t_end, int64_t n_begin,
                      int64_t n_end) {
  const int64_t tm = gffn_tile_m(), hs = a->n_active * a->s;
  const float* h = gffn_h(a, (float*)scratch);
  for (int64_t t0 = t_begin; t0 < t_end; t0 += tm) {
    const int tc = (int)(a->t - t0 < tm ? a->t - t0 : tm);
    const float* ht = h + t0 * hs;
    ES_GFFN_SWITCH(gffn_down_tile, tc, a, ht, t0, n_begin, n_end)
  }
}

// Single-threaded whole operator for tokens [t_begin, t_end) (tile aligned).
static void gffn_range(const es_gffn_args* a, float* scratch, int64_t t_begin, int64_t t_end) {
  gffn_pack(a, scratch, t_begin, t_end);
  gffn_up(a, scratch, t_begin, t_end, 0, a->n_active);
  gffn_down(a, scratch, t_begin, t_end, 0, a->d_out);
}

}  // namespace ES_NS

#endif
