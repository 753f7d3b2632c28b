// Delta attention kernel, one source compiled once per ISA (DL_WIDTH floats per vector:
// 16 = AVX-512, 8 = AVX2, 4 = SSE2/NEON). GCC/Clang vector extensions carry the arithmetic;
// only the comparison -> bitmask step uses ISA intrinsics where they exist.
//
// Layout of the work for one head and one query row (see delta_attention.h for the maths):
//   1. query delta: the dims whose |q_t - qh| > theta_q, as a short list (index, delta*scale);
//   2. far scores sh[lo, fe) += sum over that list of delta * KT[dim][keys]: keys are the
//      contiguous axis of KT, so the inner loop is a vector FMA over 4 vectors of keys held in
//      registers while it walks the active dims only (skipped dims are never loaded);
//   3. keys that left the window this row get a full dot product with qh;
//   4. near keys (window and sinks) get exact scores;
//   5. weights exp(s - c) for the far and near keys, with a reference c that moves only when
//      the row maximum drifts by more than 20 (rescaling U, Zh and wh then);
//   6. value side: far keys whose weight moved by more than theta_v * Z are re-applied to U
//      (D MACs each); the others cost one compare per key;
//   7. y_t = (U + sum_near w v) / (Zh + Z_near).
// Far keys are [lo, fe): lo is `sinks`, or with a sliding window (span) the oldest key the row
// sees; a far key that leaves the sliding window is subtracted from U and Zh (D MACs).
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__SSE__)
#include <immintrin.h>
#endif

#include "delta_attention.h"

#ifndef DL_WIDTH
#define DL_WIDTH 4
#endif
#ifndef DL_TABLE_NAME
#define DL_TABLE_NAME dl_table_generic
#endif
#ifndef DL_ISA_NAME
#define DL_ISA_NAME "generic"
#endif

namespace {

constexpr int W = DL_WIDTH;
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef double vd __attribute__((vector_size(W * 8)));

inline vf ld(const float* p) {
  vf v;
  memcpy(&v, p, sizeof v);
  return v;
}
inline void st(float* p, vf v) { memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
inline vi splati(int32_t x) { return vi{} + x; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf vabs(vf a) { return a < splat(0.f) ? -a : a; }
inline vi iota() {
  vi r;
  for (int i = 0; i < W; ++i) r[i] = i;
  return r;
}
inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
inline uint32_t bits(vi m) {
#if DL_WIDTH == 16 && defined(__AVX512DQ__)
  return (uint32_t)_mm512_movepi32_mask((__m512i)m);
#elif DL_WIDTH == 8 && defined(__AVX2__)
  return (uint32_t)_mm256_movemask_ps((__m256)m);
#else
  uint32_t r = 0;
  for (int i = 0; i < W; ++i) r |= (m[i] ? 1u : 0u) << i;
  return r;
#endif
}
// lanes of the vector starting at key j0 that lie in [lo, hi)
inline vi in_range(int64_t j0, int64_t lo, int64_t hi) {
  vi j = iota() + splati((int32_t)j0);
  return (j >= splati((int32_t)lo)) & (j < splati((int32_t)hi));
}

// Appends the lanes set in m (key index j0 + lane, and that lane of x) to idx and dx; returns
// how many. AVX-512 compresses in registers and stores whole vectors (the arrays have a vector
// of slack; the memory form of vcompress is microcoded on some CPUs); elsewhere a bit walk.
inline int compress(uint32_t m, int64_t j0, vf x, int32_t* idx, float* dx) {
#if DL_WIDTH == 16 && defined(__AVX512F__)
  const __mmask16 k = (__mmask16)m;
  _mm512_storeu_si512(idx, _mm512_maskz_compress_epi32(k, (__m512i)(iota() + splati((int32_t)j0))));
  _mm512_storeu_ps(dx, _mm512_maskz_compress_ps(k, (__m512)x));
  return __builtin_popcount(m);
#else
  float lanes[W];
  st(lanes, x);
  int n = 0;
  while (m) {
    const int i = __builtin_ctz(m);
    m &= m - 1;
    idx[n] = (int32_t)(j0 + i);
    dx[n] = lanes[i];
    ++n;
  }
  return n;
#endif
}

// exp(x), |relative error| < 2e-7 on [-87, 88]: x = n ln2 + r, exp(r) by a degree-6 polynomial.
inline vf vexp(vf x) {
  x = x < splat(-87.f) ? splat(-87.f) : x;
  x = x > splat(88.f) ? splat(88.f) : x;
  const vf shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf t = x * splat(1.44269504088896341f) + shifter;
  vf n = t - shifter;
  vi ni = (vi)t - (vi)shifter;
  vf r = x - n * splat(0.693145751953125f);
  r = r - n * splat(1.428606765330187e-06f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * (r * r) + r + splat(1.f);
  vi e = (ni + splati(127)) << 23;
  return p * (vf)e;
}
inline float sexp(float x) {
  vf v = vexp(splat(x));
  return v[0];
}
// attention logit soft-capping, cap * tanh(x / cap) (identity when cap is 0); tanh(u) is
// 1 - 2 / (exp(2u) + 1): absolute error ~1e-7, i.e. ~cap * 1e-7 on the logit
inline vf capv(vf x, float cap) {
  if (cap <= 0.f) return x;
  const vf e = vexp(x * splat(2.f / cap));
  return splat(cap) - splat(2.f * cap) / (e + splat(1.f));
}
inline float capf(float x, float cap) {
  vf v = capv(splat(x), cap);
  return v[0];
}


constexpr float kNegInf = -INFINITY;
constexpr int kMaxDim = 256;

void transpose(const float* k, int64_t n, int64_t d, int64_t n_pad, float* kt, float* kmax) {
  const int64_t tile = 32;
  for (int64_t c = 0; c < d; ++c) kmax[c] = 0.f;
  for (int64_t j0 = 0; j0 < n; j0 += tile) {
    const int64_t j1 = j0 + tile < n ? j0 + tile : n;
    for (int64_t c = 0; c < d; ++c) {
      float* row = kt + c * n_pad;
      float m = kmax[c];
      for (int64_t j = j0; j < j1; ++j) {
        const float x = k[j * d + c];
        row[j] = x;
        m = fabsf(x) > m ? fabsf(x) : m;
      }
      kmax[c] = m;
    }
  }
  for (int64_t c = 0; c < d; ++c) memset(kt + c * n_pad + n, 0, sizeof(float) * (size_t)(n_pad - n));
}

// A head row of NV vectors, kept in registers.
template <int NV>
struct Acc {
  vf r[NV];
  void zero() {
    for (int i = 0; i < NV; ++i) r[i] = splat(0.f);
  }
  void load(const float* p) {
    for (int i = 0; i < NV; ++i) r[i] = ld(p + i * W);
  }
  void store(float* p) const {
    for (int i = 0; i < NV; ++i) st(p + i * W, r[i]);
  }
  void fma(float a, const float* x) {
    const vf av = splat(a);
    for (int i = 0; i < NV; ++i) r[i] += av * ld(x + i * W);
  }
  void scale(float a) {
    const vf av = splat(a);
    for (int i = 0; i < NV; ++i) r[i] *= av;
  }
};

template <int NV>
inline float dotv(const float* a, const float* b) {
  vf acc = ld(a) * ld(b);
  for (int i = 1; i < NV; ++i) acc += ld(a + i * W) * ld(b + i * W);
  return hsum(acc);
}

// Old far keys [lo, hi): sh += sum_i dv[i] * kt[act[i]] (skipped when n_act == 0); when
// `fused`, also w = exp(sh - c) and the value-side decisions against wh, updating U and zh.
// Returns the max of the updated sh over [lo, hi).
constexpr int kRows = 8;     // query rows per chunk (phase A reuses each key block for all of them)
constexpr int kBlock = 8;    // vectors of keys per block
constexpr float kDrift = 20.f;
constexpr int kMaxHalvings = 16;    // value-side threshold halvings in one row before refreshing all
constexpr float kCancel = 1000.f;  // rebuild U and zh once they fell this far below their peak

// Phase A. Keys [lo, hi) are far for every row of the chunk. For each block of keys, load the
// running far scores once and apply, row after row, that row's query delta over its active
// dims only; row r's scores go to rows[r]. The key block of KT is reused across the rows from
// L1, and skipped dims are never loaded. mx[r]: max of row r's far scores.
void far_scores(const float* sh, float* const* rows, int n_rows, const float* kt, int64_t n_pad,
                const int (*act)[kMaxDim], const float (*dv)[kMaxDim], const int* n_act, int64_t lo, int64_t hi,
                float* mx) {
  vf m[kRows];
  for (int r = 0; r < n_rows; ++r) m[r] = splat(kNegInf);
  for (int64_t j = lo / W * W; j < hi; j += kBlock * W) {
    const int nb = (hi - j + W - 1) / W < kBlock ? (int)((hi - j + W - 1) / W) : kBlock;
    vf a[kBlock];
    for (int b = 0; b < nb; ++b) a[b] = ld(sh + j + b * W);
    for (int r = 0; r < n_rows; ++r) {
      const int na = n_act[r];
      if (nb == kBlock) {
        for (int i = 0; i < na; ++i) {
          const float* k = kt + (int64_t)act[r][i] * n_pad + j;
          const vf s = splat(dv[r][i]);
          for (int b = 0; b < kBlock; ++b) a[b] += s * ld(k + b * W);
        }
      } else {
        for (int i = 0; i < na; ++i) {
          const float* k = kt + (int64_t)act[r][i] * n_pad + j;
          const vf s = splat(dv[r][i]);
          for (int b = 0; b < nb; ++b) a[b] += s * ld(k + b * W);
        }
      }
      for (int b = 0; b < nb; ++b) {
        const int64_t j0 = j + b * W;
        st(rows[r] + j0, a[b]);
        const bool edge = j0 < lo || j0 + W > hi;
        m[r] = vmax(m[r], edge ? (in_range(j0, lo, hi) ? a[b] : splat(kNegInf)) : a[b]);
      }
    }
  }
  for (int r = 0; r < n_rows; ++r) mx[r] = hmax(m[r]);
}

// Phase B, value side, one pass over the keys [lo, hi) that were far before this row: keys
// whose weight deviates from the weight they were last applied with by at least `thr` are
// re-applied to U and zh with their current weight (D MACs each); the deviations left stale
// are summed into *kept. `first`: compute the current weights exp(s - c) into wb; otherwise
// reuse wb (a later pass of the same row, with a lower threshold).
template <int NV, bool first>
float far_pass(const float* s, float* wb, float* wh, int64_t lo, int64_t hi, float c, float cap, float thr, const float* v,
               Acc<NV>& U, float& zh, float& removed, float* kept, float* kept_up, int64_t& n_upd, int32_t* idx,
               float* dw) {
  const vf cv = splat(c), thrv = splat(thr), thr2 = splat(2.f * thr), zero = splat(0.f);
  vf wmax = zero, kv = zero, kv2 = zero, dz = zero, rm = zero;
  int64_t n = 0;
  for (int64_t j0 = lo / W * W; j0 < hi; j0 += W) {
    vf w;
    if (first) {
      w = vexp(capv(ld(s + j0), cap) - cv);
      st(wb + j0, w);
    } else {
      w = ld(wb + j0);
    }
    const vf o = ld(wh + j0);
    const vf diff = w - o;
    const vf dev = vabs(diff);
    const bool edge = j0 < lo || j0 + W > hi;
    const vi valid = edge ? in_range(j0, lo, hi) : splati(-1);
    const vi moved = valid & (dev >= thrv) & (dev > zero);
    kv += (valid & ~moved) ? dev : zero;
    if (first) kv2 += (valid & (dev < thr2)) ? dev : zero;  // what a threshold twice as high would leave
    wmax = vmax(wmax, valid ? (moved ? w : o) : zero);
    const uint32_t m = bits(moved);
    if (!m) continue;
    // the running sums' change in vector lanes (a scalar chain through zh would serialise)
    const vf dm = moved ? diff : zero;
    dz += dm;
    rm -= dm < zero ? dm : zero;
    st(wh + j0, moved ? w : o);
    n += compress(m, j0, diff, idx + n, dw + n);  // the value rows are accumulated below
  }
  *kept = hsum(kv);
  if (first) *kept_up = hsum(kv2);
  zh += hsum(dz);
  removed += hsum(rm);
  // two independent accumulation chains in locals (through the reference U the compiler
  // would store and reload it every key: it cannot rule out aliasing with dw)
  Acc<NV> U1 = U, U2;
  U2.zero();
  int64_t i = 0;
  for (; i + 1 < n; i += 2) {
    U1.fma(dw[i], v + (int64_t)idx[i] * (NV * W));
    U2.fma(dw[i + 1], v + (int64_t)idx[i + 1] * (NV * W));
  }
  if (i < n) U1.fma(dw[i], v + (int64_t)idx[i] * (NV * W));
  for (int k = 0; k < NV; ++k) U.r[k] = U1.r[k] + U2.r[k];
  n_upd += n;
  return hmax(wmax);
}

// Exact scores of the window keys [lo, hi] (vector-aligned superset written, other lanes kept).
template <int NV>
float window_scores(const float* qs, const float* kt, int64_t n_pad, int64_t lo, int64_t hi, float* out) {
  constexpr int64_t D = NV * W;
  vf mx = splat(kNegInf);
  int64_t j = lo / W * W;
  for (; j <= hi; j += 2 * W) {
    vf a0 = splat(0.f), a1 = splat(0.f), b0 = splat(0.f), b1 = splat(0.f);
    const bool two = j + W <= hi;
    for (int64_t d = 0; d < D; d += 2) {
      const float* k0 = kt + d * n_pad + j;
      const float* k1 = k0 + n_pad;
      a0 += splat(qs[d]) * ld(k0);
      b0 += splat(qs[d + 1]) * ld(k1);
      if (two) {
        a1 += splat(qs[d]) * ld(k0 + W);
        b1 += splat(qs[d + 1]) * ld(k1 + W);
      }
    }
    const vf s0 = a0 + b0, s1 = a1 + b1;
    const vi keep0 = in_range(j, lo, hi + 1);
    st(out + j, keep0 ? s0 : ld(out + j));
    mx = vmax(mx, keep0 ? s0 : splat(kNegInf));
    if (two) {
      const vi keep1 = in_range(j + W, lo, hi + 1);
      st(out + j + W, keep1 ? s1 : ld(out + j + W));
      mx = vmax(mx, keep1 ? s1 : splat(kNegInf));
    }
  }
  return hmax(mx);
}

template <int NV>
void head_impl(dl_head_args* a) {
  constexpr int64_t D = NV * W;
  const int64_t T = a->t, N = a->n, NP = a->n_pad, P = N - T;
  const int64_t win = a->window, sinks = a->sinks;
  const float scale = a->scale, thv = a->theta_v, cap = a->softcap;
  const int64_t span = a->span;
  const float* thq = a->theta_q;
  const float* kt = a->kt;
  float* sh = a->scratch;             // far scores (scaled), as of the last finished chunk
  float* wh = sh + NP;                // weights last applied (units of c)
  float* nb = wh + NP;                // near scores, then near weights
  float* wb = nb + NP;                // current far weights
  float* rows[kRows];                 // phase A output, one score row per query row of the chunk
  for (int r = 0; r < kRows; ++r) rows[r] = wb + NP + r * NP;
  float* rdw = wb + NP + kRows * NP;  // refreshed keys: weight changes
  int32_t* ridx = (int32_t*)(rdw + NP);  // refreshed keys: indices
  float* qh = rdw + 2 * NP;           // transmitted query
  float* qs = qh + D;                 // scaled query row
  int act[kRows][kMaxDim];
  float dv[kRows][kMaxDim];
  int n_act[kRows];
  float qhr[kRows][kMaxDim];          // qh after each row's update (new far keys need it)
  float mfar[kRows];
  memset(sh, 0, sizeof(float) * (size_t)(3 * NP));

  Acc<NV> U;
  U.zero();
  bool have_q = false, have_c = false;
  float c = 0.f, zh = 0.f, den_prev = 0.f, wmax = 0.f;
  float held_peak = 0.f;  // largest zh since the running sums were last rebuilt (units of c)
  float thr_ratio = 1.f;  // last row's value-side threshold / budget
  bool thr_grow = false;  // the last row's doubled threshold would have kept within budget
  // far keys held in the running sums: [lo, fe). lo is `sinks`, or with a sliding window the
  // oldest key the row still sees (older far keys leave the sums: lo only grows)
  auto lo_of = [&](int64_t p) -> int64_t {
    if (span <= 0) return sinks;
    return p - span + 1 > 0 ? p - span + 1 : 0;
  };
  int64_t lo = lo_of(P);
  int64_t fe = lo;
  if (a->state_in && a->state_in[0] != 0.f) {
    const float* s = a->state_in;
    c = s[1];
    zh = s[2];
    const int64_t ns = (int64_t)s[3];
    den_prev = s[4];
    wmax = s[5];
    held_peak = s[6];
    thr_ratio = fabsf(s[7]);
    thr_grow = s[7] < 0.f;
    memcpy(qh, s + 8, sizeof(float) * (size_t)D);
    U.load(s + 8 + D);
    const float* st_rows = s + DL_STATE_HEADER(D);
    memcpy(sh, st_rows, sizeof(float) * (size_t)ns);
    memcpy(wh, st_rows + ns, sizeof(float) * (size_t)ns);
    have_q = have_c = true;
    const int64_t last = P - 1;  // position of the last row the state has seen
    lo = lo_of(last);
    fe = last - win + 1 > lo ? last - win + 1 : lo;
  }

  int64_t dense = 0, qk = 0, pv = 0;
  for (int64_t t0 = 0; t0 < T; t0 += kRows) {
    const int n_rows = T - t0 < kRows ? (int)(T - t0) : kRows;
    // query deltas of the chunk's rows (sequential, D compares per row)
    for (int r = 0; r < n_rows; ++r) {
      const float* qt = a->q + (t0 + r) * D;
      int na = 0;
      if (!have_q) {
        memcpy(qh, qt, sizeof(float) * (size_t)D);
        have_q = true;
        na = -1;  // first row of a fresh sequence: no far key is known yet
      } else {
        // vector compare, then walk the set bits (a branch per dim would mispredict)
        for (int64_t d0 = 0; d0 < D; d0 += W) {
          const vf x = ld(qt + d0), o = ld(qh + d0);
          const vf diff = x - o;
          const vi moved = vabs(diff) > ld(thq + d0);
          uint32_t m = bits(moved);
          if (!m) continue;
          st(qh + d0, moved ? x : o);
          na += compress(m, d0, diff * splat(scale), act[r] + na, dv[r] + na);  // na + W <= D: slack
        }
      }
      n_act[r] = na;
      memcpy(qhr[r], qh, sizeof(float) * (size_t)D);
    }
    int n_act_a[kRows];
    for (int r = 0; r < n_rows; ++r) n_act_a[r] = n_act[r] < 0 ? 0 : n_act[r];
    // phase A: keys far before the chunk (with a sliding window, keys that leave it during the
    // chunk are updated too: at most kRows - 1 of them per row)
    const int64_t fe0 = fe, lo0 = lo;
    if (fe0 > lo0)
      far_scores(sh, rows, n_rows, kt, NP, act, dv, n_act_a, lo0, fe0, mfar);
    else
      for (int r = 0; r < n_rows; ++r) mfar[r] = kNegInf;

    // phase B: row by row
    for (int r = 0; r < n_rows; ++r) {
      const int64_t p = P + t0 + r;
      const float* qt = a->q + (t0 + r) * D;
      // sliding window: the far keys this row no longer sees leave the running sums
      const int64_t lo_p = lo_of(p);
      int64_t n_left = 0;
      float left = 0.f;
      if (lo_p > lo) {
        const int64_t hi = lo_p < fe ? lo_p : fe;
        for (int64_t j = lo; j < hi; ++j) {
          if (wh[j] != 0.f) {
            U.fma(-wh[j], a->v + j * D);
            zh -= wh[j];
            left += wh[j];
            wh[j] = 0.f;
          }
          ++n_left;
        }
        lo = lo_p;
        if (fe <= lo) {  // nothing held any more: drop the subtraction's rounding residue
          fe = lo;
          U.zero();
          zh = 0.f;
        }
      }
      int64_t fe_new = p - win + 1 > lo ? p - win + 1 : lo;  // far keys this row: [lo, fe_new)
      if (fe_new > p + 1) fe_new = p + 1;
      if (fe_new < fe) fe_new = fe;
      const int64_t n_old = fe > lo ? fe - lo : 0;
      const int64_t new_lo = fe > lo ? fe : lo;
      const int na = n_act_a[r];
      float m = n_old > 0 ? mfar[r] : kNegInf;
      // keys that became far earlier in this chunk: incremental update from row-major K
      for (int64_t j = fe0 > lo ? fe0 : lo; j < new_lo; ++j) {
        const float* kj = a->k + j * D;
        float acc[4] = {sh[j], 0.f, 0.f, 0.f};  // four chains: the FMA latency, not the loads, bounds one
        int i = 0;
        for (; i + 4 <= na; i += 4)
          for (int u = 0; u < 4; ++u) acc[u] += dv[r][i + u] * kj[act[r][i + u]];
        for (; i < na; ++i) acc[0] += dv[r][i] * kj[act[r][i]];
        sh[j] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        m = sh[j] > m ? sh[j] : m;
      }
      // keys that become far at this row: full dot with the transmitted query
      for (int64_t j = new_lo; j < fe_new; ++j) {
        sh[j] = scale * dotv<NV>(qhr[r], a->k + j * D);
        m = sh[j] > m ? sh[j] : m;
      }
      // near keys: sinks and window, exact
      for (int64_t d = 0; d < D; ++d) qs[d] = qt[d] * scale;
      const int64_t sink_hi = sinks < p + 1 ? sinks : p + 1;
      for (int64_t j = 0; j < sink_hi; ++j) {
        nb[j] = dotv<NV>(qs, a->k + j * D);
        m = nb[j] > m ? nb[j] : m;
      }
      int64_t ws = fe_new > sink_hi ? fe_new : sink_hi;  // window keys [ws, p]
      const int64_t first = span > 0 && p - span + 1 > 0 ? p - span + 1 : 0;  // sliding window: older keys unseen
      if (ws < first) ws = first;
      if (ws <= p) m = fmaxf(m, window_scores<NV>(qs, kt, NP, ws, p, nb));

      // exp reference: the larger of the row maximum and the largest applied far score (so no
      // weight exceeds 1 there), moved only when it drifts by kDrift (rescaling U, zh and wh)
      if (wmax <= 0.f) {  // no far weight is held (none yet, or all underflowed): drop rounding residue
        U.zero();
        zh = 0.f;
        held_peak = 0.f;
      }
      m = capf(m, cap);  // monotone: the capped maximum is the maximum of the capped logits
      const float target = wmax > 0.f ? fmaxf(m, c + logf(wmax)) : m;
      if (!have_c || target > c + kDrift || target < c - kDrift) {
        if (have_c) {
          const float f = sexp(c - target);
          U.scale(f);
          zh *= f;
          den_prev *= f;
          held_peak *= f;
          for (int64_t j = lo; j < fe; ++j) wh[j] *= f;
        }
        c = target;
        have_c = true;
      }
      // value side, far keys: refresh the keys whose weight deviates most. The threshold starts
      // at the last row's (twice that when the last row found the doubled one would have kept
      // within budget; never above the budget theta_v * Z) and halves until the deviations left
      // stale add up to at most the budget (Z: the last row's denominator)
      int64_t n_upd = 0;
      const float budget = thv * den_prev;
      wmax = 0.f;
      float removed = left;  // weight taken out of the running sums this row
      if (new_lo > lo) {
        // keys that became far earlier in this chunk have their scores in sh: bring them over
        for (int64_t j = fe0 > lo ? fe0 : lo; j < new_lo; ++j) rows[r][j] = sh[j];
        float ratio = thr_grow ? (thr_ratio * 2.f < 1.f ? thr_ratio * 2.f : 1.f) : thr_ratio;
        float kept = 0.f, kept_up = 0.f;
        wmax = far_pass<NV, true>(rows[r], wb, wh, lo, new_lo, c, cap, ratio * budget, a->v, U, zh, removed, &kept,
                                  &kept_up, n_upd, ridx, rdw);
        thr_grow = kept_up <= budget && ratio < 1.f;
        for (int level = 0; kept > budget; ++level) {
          ratio = level < kMaxHalvings ? ratio * 0.5f : 0.f;
          wmax = far_pass<NV, false>(rows[r], wb, wh, lo, new_lo, c, cap, ratio * budget, a->v, U, zh, removed, &kept,
                                     &kept_up, n_upd, ridx, rdw);
          thr_grow = false;
          if (ratio == 0.f) break;
        }
        thr_ratio = ratio;
      }
      int64_t n_rebuilt = 0;
      held_peak = fmaxf(held_peak, zh + removed);
      if (held_peak > kCancel * zh && n_old > 0) {
        // most of the held weight left at once: the running sums are now a small difference of
        // large numbers, so rebuild them from the weights (D MACs per far key, counted)
        U.zero();
        zh = 0.f;
        for (int64_t j = lo; j < new_lo; ++j)
          if (wh[j] != 0.f) {
            U.fma(wh[j], a->v + j * D);
            zh += wh[j];
          }
        n_rebuilt = new_lo - lo;
        held_peak = zh;
      }
      for (int64_t j = new_lo; j < fe_new; ++j) {
        const float w = sexp(capf(sh[j], cap) - c);
        U.fma(w, a->v + j * D);
        zh += w;
        wh[j] = w;
        wmax = fmaxf(wmax, w);
      }
      // near keys
      Acc<NV> O = U, O2;
      O2.zero();
      float zn = 0.f;
      for (int64_t j = 0; j < sink_hi; ++j) {
        const float w = sexp(capf(nb[j], cap) - c);
        zn += w;
        O.fma(w, a->v + j * D);
      }
      if (ws <= p) {
        vf zv = splat(0.f);
        for (int64_t j = ws / W * W; j <= p; j += W) {
          const vi keep = in_range(j, ws, p + 1);
          const vf e = keep ? vexp(capv(ld(nb + j), cap) - splat(c)) : splat(0.f);
          st(nb + j, e);
          zv += e;
        }
        zn += hsum(zv);
        int64_t j = ws;
        for (; j + 1 <= p; j += 2) {
          O.fma(nb[j], a->v + j * D);
          O2.fma(nb[j + 1], a->v + (j + 1) * D);
        }
        if (j <= p) O.fma(nb[j], a->v + j * D);
        for (int i = 0; i < NV; ++i) O.r[i] += O2.r[i];
      }
      const float den = zh + zn;
      O.scale(1.f / den);
      O.store(a->y + (t0 + r) * D);
      den_prev = den;

      const int64_t n_new = fe_new - new_lo;
      const int64_t n_near = sink_hi + (ws <= p ? p - ws + 1 : 0);
      dense += 2 * D * (p + 1 - first);
      qk += (n_near + n_new) * D + (int64_t)na * n_old;
      pv += (n_near + n_new) * D + (n_upd + n_rebuilt + n_left) * D;
      fe = fe_new;
    }
    // the chunk's last score row becomes the running far scores
    if (fe0 > lo0) memcpy(sh + lo0, rows[n_rows - 1] + lo0, sizeof(float) * (size_t)(fe0 - lo0));
  }
  a->macs[0] = dense;
  a->macs[1] = qk;
  a->macs[2] = pv;

  if (a->state_out) {
    float* s = a->state_out;
    s[0] = 1.f;
    s[1] = c;
    s[2] = zh;
    s[3] = (float)N;
    s[4] = den_prev;
    s[5] = wmax;
    s[6] = held_peak;
    s[7] = thr_grow ? -thr_ratio : thr_ratio;
    memcpy(s + 8, qh, sizeof(float) * (size_t)D);
    U.store(s + 8 + D);
    float* st_rows = s + DL_STATE_HEADER(D);
    memcpy(st_rows, sh, sizeof(float) * (size_t)N);
    memcpy(st_rows + N, wh, sizeof(float) * (size_t)N);
  }
}

// Tiny weights (exp of very negative scores) and their differences can be subnormal; CPUs
// handle those in slow microcode, so the kernel flushes them to zero (x86: MXCSR FTZ/DAZ).
struct FlushDenormals {
#if defined(__SSE__) || defined(__x86_64__)
  unsigned saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

#define DL_HEAD_CASES(X) X(1) X(2) X(4) X(5) X(6) X(8) X(10) X(12) X(16) X(20) X(24) X(32) X(64)

void head(dl_head_args* a) {
  FlushDenormals guard;
  switch (a->d / W) {
#define DL_CASE(n) \
  case n:          \
    head_impl<n>(a); \
    break;
    DL_HEAD_CASES(DL_CASE)
#undef DL_CASE
    default:
      break;  // the glue checks supports() first
  }
}

// head dims this copy handles: D = W * n for the n instantiated above, D <= 256
int supports(int64_t d) {
  if (d % W || d > kMaxDim) return 0;
  switch (d / W) {
#define DL_CASE(n) \
  case n:          \
    return 1;
    DL_HEAD_CASES(DL_CASE)
#undef DL_CASE
    default:
      return 0;
  }
}

}  // namespace

extern "C" const dl_table DL_TABLE_NAME = {DL_ISA_NAME, W, head, transpose, supports};
