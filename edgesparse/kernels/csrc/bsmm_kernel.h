// Block-sparse matmul kernel: Y = act(X @ W + bias), W in B x 1 blocks.
//
// Vectorised over the B outputs of a block row (one or more native vectors),
// register-tiled over T tokens: each weight block is loaded once per tile of T
// tokens and multiplied with T broadcast inputs. X is first packed per token
// tile as xt[k * T + t] so the T inputs for one k_index share a cache line
// (the k_index gather then touches one line per block instead of T).
// With one token (M == 1) X is used in place and several independent
// accumulator chains hide the FMA latency instead.
#ifndef EDGESPARSE_BSMM_KERNEL_H
#define EDGESPARSE_BSMM_KERNEL_H

#include "es_activation.h"
#include "es_kernels.h"
#include "es_simd.h"

#if defined(ES_ISA_AVX512)
#include <immintrin.h>
#endif

namespace ES_NS {

// Tokens per register tile: T * R accumulators + R weight vectors + one
// broadcast must fit in the register file.
#ifndef ES_BSMM_TMAX
#define ES_BSMM_TMAX 8
#endif
// Software prefetch distance (bytes) for the weights and indices in the few-token
// loop (bsmm_accumulate); 0 = off. On AVX-512 the loop outruns the hardware
// prefetchers: 2 KB ahead made M = 8 10-20 % faster on the FFN shapes (Xeon,
// docs/kernels.md); on AVX2 it measured even, and farther prefetches (64-256 KB,
// into L2) or non-temporal ones were slower on both.
#ifndef ES_BSMM_PREFETCH
#if defined(ES_ISA_AVX512)
#define ES_BSMM_PREFETCH 2048
#else
#define ES_BSMM_PREFETCH 0
#endif
#endif
// Weights of the block rows processed together over all token tiles; sized to
// stay in L2 while the packed X tiles stream through.
#ifndef ES_BSMM_GROUP_BYTES
#define ES_BSMM_GROUP_BYTES (256 * 1024)
#endif

template <int B>
struct BsmmTile {
  static constexpr int R = Lanes<B>::R;
  static constexpr int fit = (ES_NUM_VREGS - 2 - R) / R;
  static constexpr int T = fit > ES_BSMM_TMAX ? ES_BSMM_TMAX : (fit < 1 ? 1 : fit);
};

static inline int32_t bsmm_tile_m(int32_t block) {
  switch (block) {
    case 4:
      return BsmmTile<4>::T;
    case 8:
      return BsmmTile<8>::T;
    default:
      return BsmmTile<16>::T;
  }
}

// Independent accumulator sets in bsmm_accumulate for a tile of t tokens x r
// vectors: with few tokens one chain per output vector would wait on the FMA
// latency (4 cycles) every block. On AVX2 / AVX-512 sets are added until there
// are 12 / 16 chains or the registers run out (measured: 8 chains ran at ~80 %
// of 12); the 16-byte-vector builds keep the rule they were measured with.
static constexpr int bsmm_sets(int t, int r) {
#if ES_VEC_FLOATS >= 8
  int u = ((ES_NUM_VREGS >= 32 ? 16 : 12) + t * r - 1) / (t * r);
  const int fit = (ES_NUM_VREGS - r - 1) / (t * r);  // beside r weight vectors and one broadcast
  if (u > fit) u = fit;
  if (u > 4) u = 4;
  return u < 1 ? 1 : u;
#else
  return t * r >= 4 ? 1 : (t * r == 1 ? 4 : 2);
#endif
}

// acc[t][r] = sum over blocks p in [p0, p1) of values[p, r*L:(r+1)*L] * xt[k_index[p] * T + t]
// (a packed tile of T tokens; with one token, X itself). The stride is the
// template's T, not a run-time argument: multiplying by a run-time stride put an
// imul (which shares a port with the FMAs) on every block (AVX2, M = 64: 3-8 %
// slower).
template <int B, int T>
ES_INLINE void bsmm_accumulate(const float* ES_RESTRICT xt,
                               const float* ES_RESTRICT vals, const int32_t* ES_RESTRICT kidx,
                               int32_t p0, int32_t p1, typename Lanes<B>::V (&acc)[T][Lanes<B>::R]) {
  typedef typename Lanes<B>::V V;
  constexpr int L = Lanes<B>::L, R = Lanes<B>::R;
  constexpr int U = bsmm_sets(T, R);
  V part[U][T][R];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) part[u][t][r] = vzero<V>();
  int32_t p = p0;
  for (; p + U <= p1; p += U) {
    for (int u = 0; u < U; ++u) {
      const float* xp = xt + (int64_t)kidx[p + u] * T;
      const float* w = vals + (int64_t)(p + u) * B;
#if ES_BSMM_PREFETCH > 0
      // one prefetch per 64-byte line of values and of indices
      if ((((p + u) * B) & 15) == 0) __builtin_prefetch(w + ES_BSMM_PREFETCH / 4, 0, 3);
      if (((p + u) & 15) == 0) __builtin_prefetch(kidx + p + u + ES_BSMM_PREFETCH / 16, 0, 3);
#endif
      // token outer, output vector inner: one broadcast live at a time
      // (R weights + 1 broadcast + T * R accumulators is what BsmmTile sizes;
      // the other order kept T broadcasts live and spilled accumulators on AVX2)
      V wv[R];
      for (int r = 0; r < R; ++r) wv[r] = vload<V>(w + r * L);
      for (int t = 0; t < T; ++t) {
        const float xs = xp[t];
        for (int r = 0; r < R; ++r) part[u][t][r] += wv[r] * xs;
      }
    }
  }
  for (; p < p1; ++p) {
    const float* xp = xt + (int64_t)kidx[p] * T;
    const float* w = vals + (int64_t)p * B;
    V wv[R];
    for (int r = 0; r < R; ++r) wv[r] = vload<V>(w + r * L);
    for (int t = 0; t < T; ++t) {
      const float xs = xp[t];
      for (int r = 0; r < R; ++r) part[0][t][r] += wv[r] * xs;
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) {
      V s = part[0][t][r];
      for (int u = 1; u < U; ++u) s += part[u][t][r];
      acc[t][r] = s;
    }
}

// Block rows [jb, je) for the T tokens starting at m0 (inputs at xt, stride T).
template <int B, int T>
static void bsmm_rows(const es_bsmm_args* a, const float* xt, int64_t m0, int64_t jb, int64_t je) {
  typedef typename Lanes<B>::V V;
  constexpr int L = Lanes<B>::L, R = Lanes<B>::R;
  const int64_t n = a->n;
  const int act = a->activation;
  for (int64_t j = jb; j < je; ++j) {
    V acc[T][R];
    bsmm_accumulate<B, T>(xt, a->values, a->k_index, a->row_ptr[j], a->row_ptr[j + 1], acc);
    const int64_t n0 = j * B;
    const int valid = n - n0 < B ? (int)(n - n0) : B;  // last block row may be partial
    V bias[R];
    for (int r = 0; r < R; ++r) {
      int vr = valid - r * L;
      if (!a->bias || vr <= 0)
        bias[r] = vzero<V>();
      else if (vr >= L)
        bias[r] = vload<V>(a->bias + n0 + r * L);
      else
        bias[r] = vload_partial<V>(a->bias + n0 + r * L, vr);
    }
    for (int t = 0; t < T; ++t) {
      float* y = a->y + (m0 + t) * n + n0;
      for (int r = 0; r < R; ++r) {
        V v = vactivate(acc[t][r] + bias[r], act);
        int vr = valid - r * L;
        if (vr >= L)
          vstore<V>(y + r * L, v);
        else if (vr > 0)
          vstore_partial<V>(y + r * L, v, vr);
      }
    }
  }
}

// Token-vectorised variant for blocks narrower than the native vector (e.g.
// 4x1 and 8x1 blocks with AVX-512): vectors run over TV*L consecutive tokens
// of the packed tile, each of the B weights of a block is broadcast, so every
// FMA is full width. Used when M > B (see bsmm_token_path).
template <int B>
struct BsmmTokTile {
  static constexpr int TV0 = (ES_NUM_VREGS - 1) / (B + 1);
  static constexpr int TV = TV0 > 4 ? 4 : (TV0 < 1 ? 1 : TV0);
  static constexpr int T = TV * ES_VEC_FLOATS;
};

static inline bool bsmm_token_path(const es_bsmm_args* a) {
  return a->block < ES_VEC_FLOATS && a->m > a->block;
}

// 16 x 1 blocks with many tokens: the token-vectorised wide tile (below).
static inline bool bsmm_wide_path(const es_bsmm_args* a);
static inline int32_t bsmm_wide_tile(const es_bsmm_args* a);

// Tokens per packed tile for this call.
static inline int32_t bsmm_tile(const es_bsmm_args* a) {
  if (bsmm_token_path(a)) {
    switch (a->block) {
      case 4:
        return BsmmTokTile<4>::T;
      case 8:
        return BsmmTokTile<(8 < ES_VEC_FLOATS ? 8 : 4)>::T;
    }
  }
  if (bsmm_wide_path(a)) return bsmm_wide_tile(a);
  // As few tiles as the registers allow (each tile reads the weights again), of
  // about equal size: a short last tile has few accumulator chains and waits on
  // the FMA latency. Where a block takes several vectors (AVX2, 16 x 1 blocks),
  // some sizes run slower per token: 4 tokens leave 8 chains (12 did not fit),
  // 2 or fewer issue more loads than FMAs. Then the first tile grows to avoid
  // them when it can: M = 8 as 5 + 3, M = 9 as 6 + 3 (3-7 % faster than 4 + 4 and
  // 5 + 4 at 768-4096 wide FFN shapes, docs/kernels.md); M = 7 stays 4 + 3.
  const int64_t tm = bsmm_tile_m(a->block);
  if (a->m <= tm) return (int32_t)tm;
  const int64_t tiles = (a->m + tm - 1) / tm;
  const int64_t equal = (a->m + tiles - 1) / tiles;
#if ES_VEC_FLOATS >= 8
  const int r = a->block / (a->block < ES_VEC_FLOATS ? a->block : ES_VEC_FLOATS);
  if (r >= 2) {
    auto slow = [r](int64_t t) { return t * r <= 4 || t * r * bsmm_sets((int)t, r) < 10; };
    for (int64_t t = equal; t <= tm; ++t) {
      const int64_t last = a->m - (tiles - 1) * t;
      if (last < 1) break;
      if (!slow(t) && !slow(last)) return (int32_t)t;
    }
  }
#endif
  return (int32_t)equal;
}

// Block rows [jb, je) for the tc tokens of one tile (tc <= TV*L; lanes past
// tc read the next tile or the scratch slack and are never stored).
template <int B, int TV>
static void bsmm_rows_tok(const es_bsmm_args* a, const float* xt, int tc, int64_t m0, int64_t jb, int64_t je) {
  constexpr int L = ES_VEC_FLOATS;
  const int64_t n = a->n;
  for (int64_t j = jb; j < je; ++j) {
    vfloat acc[B][TV];
    for (int b = 0; b < B; ++b)
      for (int v = 0; v < TV; ++v) acc[b][v] = vzero<vfloat>();
    const int32_t p1 = a->row_ptr[j + 1];
    for (int32_t p = a->row_ptr[j]; p < p1; ++p) {
      const float* xp = xt + (int64_t)a->k_index[p] * tc;
      const float* w = a->values + (int64_t)p * B;
      vfloat xv[TV];
      for (int v = 0; v < TV; ++v) xv[v] = vload<vfloat>(xp + v * L);
      for (int b = 0; b < B; ++b) {
        const float wb = w[b];
        for (int v = 0; v < TV; ++v) acc[b][v] += xv[v] * wb;
      }
    }
    const int64_t n0 = j * B;
    const int valid = n - n0 < B ? (int)(n - n0) : B;
    float buf[B][TV * L];
    for (int b = 0; b < valid; ++b) {
      const float bias = a->bias ? a->bias[n0 + b] : 0.0f;
      for (int v = 0; v < TV; ++v) vstore<vfloat>(&buf[b][v * L], vactivate(acc[b][v] + bias, a->activation));
    }
    for (int t = 0; t < tc; ++t) {
      float* y = a->y + (m0 + t) * n + n0;
      for (int b = 0; b < valid; ++b) y[b] = buf[b][t];
    }
  }
}

template <int B>
static void bsmm_rows_tok_any(const es_bsmm_args* a, const float* xt, int tc, int64_t m0, int64_t jb, int64_t je) {
  constexpr int TV = BsmmTokTile<B>::TV;
  const int tv = (tc + ES_VEC_FLOATS - 1) / ES_VEC_FLOATS;
  switch (tv) {
    case 1:
      bsmm_rows_tok<B, 1>(a, xt, tc, m0, jb, je);
      return;
    case 2:
      if constexpr (TV >= 2) bsmm_rows_tok<B, (TV >= 2 ? 2 : 1)>(a, xt, tc, m0, jb, je);
      return;
    case 3:
      if constexpr (TV >= 3) bsmm_rows_tok<B, (TV >= 3 ? 3 : 1)>(a, xt, tc, m0, jb, je);
      return;
    default:
      if constexpr (TV >= 4) bsmm_rows_tok<B, (TV >= 4 ? 4 : 1)>(a, xt, tc, m0, jb, je);
      return;
  }
}

// Token-vectorised tile for blocks as wide as the native vector (16 x 1 blocks
// on AVX-512): with many tokens the tile above needs one load (the weight
// vector or a broadcast input) per FMA. Here vectors run over TV*L consecutive
// tokens of the packed tile and the block's outputs are taken H at a time: per
// block, TV input loads + H weight broadcasts feed H*TV FMAs (TV = 3, H = 8:
// 11 loads for 24 FMAs). The H x tokens result is transposed into Y in the
// epilogue. Used when M >= ES_BSMM_WIDE_MIN_M (see bsmm_wide_path); measured
// (docs/kernels.md): on AVX-512 at M >= 32 it is 1.2-1.5x faster than the
// tile above at 50-75 % sparsity and about even at 90 %; on AVX2 (16
// registers: 4 outputs x 3 token vectors) it was 5-15 % slower, so it is off
// there, as on the 16-byte-vector builds (not measured).
#ifndef ES_BSMM_WIDE_MIN_M
#if defined(ES_ISA_AVX512)
#define ES_BSMM_WIDE_MIN_M 32
#else
#define ES_BSMM_WIDE_MIN_M 0 /* off */
#endif
#endif
#ifndef ES_BSMM_WIDE_TV
#define ES_BSMM_WIDE_TV 3
#endif
// Weights and indices prefetched this many bytes ahead by the first pass over
// a block row (the second pass finds them in L1). In a model each layer's
// weights arrive cold from L3: 4 KB ahead made the MiniLM 75 % package 3-5 %
// faster and the (warm) FFN kernel cases even or faster; 1-2 KB gained less,
// 8 KB the same, prefetching in both passes or into L2 only slightly less.
#ifndef ES_BSMM_WIDE_PREFETCH
#define ES_BSMM_WIDE_PREFETCH 4096
#endif

static inline bool bsmm_wide_path(const es_bsmm_args* a) {
  return ES_BSMM_WIDE_MIN_M > 0 && a->block == 16 && a->block == ES_VEC_FLOATS && a->m >= ES_BSMM_WIDE_MIN_M;
}
// Tokens per tile (the last tile of a call may be shorter: M = 64 -> 48 + 16,
// which measured faster than 32 + 32).
static inline int32_t bsmm_wide_tile(const es_bsmm_args*) { return ES_BSMM_WIDE_TV * ES_VEC_FLOATS; }

// Outputs per pass for TV token vectors: H*TV accumulators + TV inputs + one
// broadcast within the register file.
template <int TV>
struct BsmmWideH {
  static constexpr int fit = (ES_NUM_VREGS - 1 - TV) / TV;
  static constexpr int H = fit > 16 ? 16 : (fit > 8 && fit < 16 ? 8 : fit);
};

// Stores tokens [t0, tc) x outputs [0, nh) of acc (outputs x token vectors)
// into y (token t's outputs at y + t * n).
template <int H, int TV>
static ES_INLINE void bsmm_wide_store_scalar(const vfloat (&acc)[H][TV], float* y, int64_t n, int t0, int tc, int nh) {
  constexpr int L = ES_VEC_FLOATS;
  float buf[H][TV * L];
  for (int b = 0; b < H; ++b)
    for (int v = 0; v < TV; ++v) vstore<vfloat>(&buf[b][v * L], acc[b][v]);
  y += (int64_t)t0 * n;
  for (int t = t0; t < tc; ++t, y += n)
    for (int b = 0; b < nh; ++b) y[b] = buf[b][t];
}

#if defined(ES_ISA_AVX512)
// r[b][v] for b in [0, 8): 8 outputs x 16 tokens; stores token t's 8 outputs
// at y + t * ldy (t in [0, 16)): unpack + shuffle within 128-bit lanes, then
// 128-bit lane pairs, 40 shuffles and 16 stores for 128 floats.
template <int TV>
static ES_INLINE void transpose_store_8x16(const vfloat (*r)[TV], int v, float* y, int64_t ldy) {
  __m512 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm512_unpacklo_ps((__m512)r[2 * i][v], (__m512)r[2 * i + 1][v]);
    t[2 * i + 1] = _mm512_unpackhi_ps((__m512)r[2 * i][v], (__m512)r[2 * i + 1][v]);
  }
  // u[q] (q = token within a 128-bit lane): outputs 0-3, u[4 + q]: outputs 4-7
  for (int h = 0; h < 2; ++h) {
    const __m512 lo01 = t[4 * h], hi01 = t[4 * h + 1], lo23 = t[4 * h + 2], hi23 = t[4 * h + 3];
    u[4 * h + 0] = _mm512_shuffle_ps(lo01, lo23, 0x44);
    u[4 * h + 1] = _mm512_shuffle_ps(lo01, lo23, 0xEE);
    u[4 * h + 2] = _mm512_shuffle_ps(hi01, hi23, 0x44);
    u[4 * h + 3] = _mm512_shuffle_ps(hi01, hi23, 0xEE);
  }
  for (int q = 0; q < 4; ++q) {
    // lanes [lo l0, lo l2, hi l0, hi l2] -> [lo l0, hi l0, lo l2, hi l2]: tokens q and 8 + q
    const __m512 e = _mm512_shuffle_f32x4(u[q], u[4 + q], 0x88);  // [lo0, lo2, hi0, hi2]
    const __m512 f = _mm512_shuffle_f32x4(u[q], u[4 + q], 0xDD);  // [lo1, lo3, hi1, hi3]
    const __m512 e2 = _mm512_shuffle_f32x4(e, e, 0xD8);            // [lo0, hi0, lo2, hi2]
    const __m512 f2 = _mm512_shuffle_f32x4(f, f, 0xD8);            // [lo1, hi1, lo3, hi3]
    _mm256_storeu_ps(y + (int64_t)q * ldy, _mm512_castps512_ps256(e2));
    _mm256_storeu_ps(y + (int64_t)(8 + q) * ldy, _mm512_extractf32x8_ps(e2, 1));
    _mm256_storeu_ps(y + (int64_t)(4 + q) * ldy, _mm512_castps512_ps256(f2));
    _mm256_storeu_ps(y + (int64_t)(12 + q) * ldy, _mm512_extractf32x8_ps(f2, 1));
  }
}
#endif

// Outputs [h0, h0 + H) of block row j (B = 16) for the tc tokens of one tile;
// stores outputs [h0, min(h0 + H, valid)).
template <int H, int TV>
static ES_INLINE void bsmm_wide_pass(const es_bsmm_args* a, const float* ES_RESTRICT xt, int tc, int64_t m0,
                                     int64_t j, int h0, int valid) {
  constexpr int L = ES_VEC_FLOATS, B = 16;
  vfloat acc[H][TV];
  for (int b = 0; b < H; ++b)
    for (int v = 0; v < TV; ++v) acc[b][v] = vzero<vfloat>();
  const int32_t p1 = a->row_ptr[j + 1];
  const int32_t* ES_RESTRICT kidx = a->k_index;
  const float* ES_RESTRICT w = a->values + (int64_t)a->row_ptr[j] * B + h0;
  for (int32_t p = a->row_ptr[j]; p < p1; ++p, w += B) {
    if (ES_BSMM_WIDE_PREFETCH > 0 && h0 == 0) {
      __builtin_prefetch(w + ES_BSMM_WIDE_PREFETCH / 4, 0, 3);  // one 64-byte block per iteration
      if ((p & 15) == 0) __builtin_prefetch(kidx + p + ES_BSMM_WIDE_PREFETCH / 16, 0, 3);
    }
    const float* xp = xt + (int64_t)kidx[p] * tc;
    vfloat xv[TV];
    for (int v = 0; v < TV; ++v) xv[v] = vload<vfloat>(xp + v * L);
    for (int b = 0; b < H; ++b) {
      const float wb = w[b];
      for (int v = 0; v < TV; ++v) acc[b][v] += xv[v] * wb;
    }
  }
  const int64_t n = a->n, n0 = j * B + h0;
  const int nh = valid - h0 < H ? valid - h0 : H;
  for (int b = 0; b < H; ++b) {
    const float bias = (a->bias && b < nh) ? a->bias[n0 + b] : 0.0f;
    for (int v = 0; v < TV; ++v) acc[b][v] = vactivate(acc[b][v] + bias, a->activation);
  }
  float* y = a->y + m0 * n + n0;
#if defined(ES_ISA_AVX512)
  if constexpr (H % 8 == 0) {
    if (nh == H) {
      // full groups of 8 outputs x 16 tokens: transposed in registers
      for (int v = 0; v < TV && (v + 1) * L <= tc; ++v)
        for (int b = 0; b < H; b += 8)
          transpose_store_8x16(&acc[b], v, y + (int64_t)v * L * n + b, n);
      const int done = tc / L * L;
      if (done == tc) return;
      bsmm_wide_store_scalar<H, TV>(acc, y, n, done, tc, nh);
      return;
    }
  }
#endif
  bsmm_wide_store_scalar<H, TV>(acc, y, n, 0, tc, nh);
}

template <int TV>
static void bsmm_rows_wide(const es_bsmm_args* a, const float* xt, int tc, int64_t m0, int64_t jb, int64_t je) {
  constexpr int H = BsmmWideH<TV>::H, B = 16;
  constexpr int full = B / H * H, rest = B - full;
  const int64_t n = a->n;
  for (int64_t j = jb; j < je; ++j) {
    const int valid = n - j * B < B ? (int)(n - j * B) : B;  // last block row may be partial
    int h0 = 0;
    for (; h0 < full && h0 < valid; h0 += H) bsmm_wide_pass<H, TV>(a, xt, tc, m0, j, h0, valid);
    if constexpr (rest > 0)
      if (h0 < valid) bsmm_wide_pass<(rest > 0 ? rest : 1), TV>(a, xt, tc, m0, j, h0, valid);
  }
}

static void bsmm_rows_wide_any(const es_bsmm_args* a, const float* xt, int tc, int64_t m0, int64_t jb,
                               int64_t je) {
  constexpr int TV = ES_BSMM_WIDE_TV;
  const int tv = (tc + ES_VEC_FLOATS - 1) / ES_VEC_FLOATS;
  switch (tv) {
    case 1:
      bsmm_rows_wide<1>(a, xt, tc, m0, jb, je);
      return;
    case 2:
      if constexpr (TV >= 2) bsmm_rows_wide<(TV >= 2 ? 2 : 1)>(a, xt, tc, m0, jb, je);
      return;
    case 3:
      if constexpr (TV >= 3) bsmm_rows_wide<(TV >= 3 ? 3 : 1)>(a, xt, tc, m0, jb, je);
      return;
    default:
      if constexpr (TV >= 4) bsmm_rows_wide<(TV >= 4 ? 4 : 1)>(a, xt, tc, m0, jb, je);
      return;
  }
}

template <int B>
static void bsmm_rows_any(int tcount, const es_bsmm_args* a, const float* xt, int64_t m0, int64_t jb,
                          int64_t je) {
  constexpr int TM = BsmmTile<B>::T;
  switch (tcount) {
#define ES_CASE(n)                                                      \
  case n:                                                               \
    if constexpr (n <= TM) bsmm_rows<B, (n <= TM ? n : 1)>(a, xt, m0, jb, je);      \
    return;
    ES_CASE(1) ES_CASE(2) ES_CASE(3) ES_CASE(4) ES_CASE(5) ES_CASE(6) ES_CASE(7) ES_CASE(8)
    ES_CASE(9) ES_CASE(10) ES_CASE(11) ES_CASE(12) ES_CASE(13) ES_CASE(14) ES_CASE(15) ES_CASE(16)
#undef ES_CASE
    default:
      return;
  }
}

// Packs token tiles of x: the tile starting at m0 with tc tokens is stored at
// xp + m0 * k as [k][tc].
static int bsmm_pack(const es_bsmm_args* a, float* xp, int64_t m_begin, int64_t m_end) {
  if (a->m <= 1) return 1;
  const int64_t k = a->k;
  const int64_t tm = bsmm_tile(a);
  for (int64_t m0 = m_begin; m0 < m_end; m0 += tm) {
    const int64_t tc = a->m - m0 < tm ? a->m - m0 : tm;
    pack_token_tile(a->x + m0 * k, k, tc, xp + m0 * k);
  }
  return 0;
}

static void bsmm_range(const es_bsmm_args* a, const float* xp, int64_t m_begin, int64_t m_end,
                       int64_t j_begin, int64_t j_end) {
  void (*rows)(int, const es_bsmm_args*, const float*, int64_t, int64_t, int64_t) =
      a->block == 4 ? bsmm_rows_any<4> : a->block == 8 ? bsmm_rows_any<8> : bsmm_rows_any<16>;
  if (a->m == 1 || xp == nullptr) {
    // unpacked: only valid token by token (stride 1)
    for (int64_t m0 = m_begin; m0 < m_end; ++m0) rows(1, a, a->x + m0 * a->k, m0, j_begin, j_end);
    return;
  }
  const int64_t tm = bsmm_tile(a);
  void (*tok)(const es_bsmm_args*, const float*, int, int64_t, int64_t, int64_t) = nullptr;
  if (bsmm_token_path(a)) tok = a->block == 4 ? bsmm_rows_tok_any<4> : bsmm_rows_tok_any<(8 < ES_VEC_FLOATS ? 8 : 4)>;
  else if (bsmm_wide_path(a))
    tok = bsmm_rows_wide_any;
  const int64_t group_blocks = ES_BSMM_GROUP_BYTES / (a->block * (int64_t)sizeof(float));
  for (int64_t j0 = j_begin; j0 < j_end;) {
    int64_t j1 = j0 + 1;
    while (j1 < j_end && a->row_ptr[j1 + 1] - a->row_ptr[j0] <= group_blocks) ++j1;
    for (int64_t m0 = m_begin; m0 < m_end; m0 += tm) {
      const int64_t tc = a->m - m0 < tm ? a->m - m0 : tm;
      if (tok)
        tok(a, xp + m0 * a->k, (int)tc, m0, j0, j1);
      else
        rows((int)tc, a, xp + m0 * a->k, m0, j0, j1);
    }
    j0 = j1;
  }
}

}  // namespace ES_NS

#endif
