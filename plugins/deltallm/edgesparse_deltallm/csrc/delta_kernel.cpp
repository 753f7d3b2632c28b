// Delta attention kernel, one source compiled once per ISA (DL_WIDTH floats per vector:
// 16 = AVX-512, 8 = AVX2, 4 = SSE2/NEON). GCC/Clang vector extensions carry the arithmetic;
// only the comparison -> bitmask step uses ISA intrinsics where they exist.
//
// Layout of the work for one head and one query row (see delta_attention.h for the maths):
//   1. query delta: the dims whose |q_t - qh| > theta_q, as a short list (index, delta*scale);
//   2. far scores sh[sinks, fe) += sum over that list of delta * KT[dim][keys]: keys are the
//      contiguous axis of KT, so the inner loop is a vector FMA over 4 vectors of keys held in
//      registers while it walks the active dims only (skipped dims are never loaded);
//   3. keys that left the window this row get a full dot product with qh;
//   4. near keys (window and sinks) get exact scores;
//   5. weights exp(s - c) for the far and near keys, with a reference c that moves only when
//      the row maximum drifts by more than 20 (rescaling U, Zh and wh then);
//   6. value side: far keys whose weight moved by more than theta_v * Z are re-applied to U
//      (D MACs each); the others cost one compare per key;
//   7. y_t = (U + sum_near w v) / (Zh + Z_near).
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX2__)
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

inline float dot(const float* a, const float* b, int64_t d) {
  vf acc = splat(0.f);
  int64_t i = 0;
  for (; i + W <= d; i += W) acc += ld(a + i) * ld(b + i);
  float s = hsum(acc);
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}
inline void axpy(float* y, float a, const float* x, int64_t d) {
  const vf av = splat(a);
  int64_t i = 0;
  for (; i + W <= d; i += W) st(y + i, ld(y + i) + av * ld(x + i));
  for (; i < d; ++i) y[i] += a * x[i];
}

constexpr float kNegInf = -INFINITY;
constexpr float kRebase = 20.f;
constexpr int kMaxDim = 256;

void transpose(const float* k, int64_t n, int64_t d, int64_t n_pad, float* kt) {
  const int64_t tile = 32;
  for (int64_t j0 = 0; j0 < n; j0 += tile) {
    const int64_t j1 = j0 + tile < n ? j0 + tile : n;
    for (int64_t c = 0; c < d; ++c) {
      float* row = kt + c * n_pad;
      for (int64_t j = j0; j < j1; ++j) row[j] = k[j * d + c];
    }
  }
  for (int64_t c = 0; c < d; ++c) memset(kt + c * n_pad + n, 0, sizeof(float) * (size_t)(n_pad - n));
}

// sh[lo, hi) += sum_i dv[i] * kt[act[i]][.]; returns the max of sh over [lo, hi).
float update_far(float* sh, const float* kt, int64_t n_pad, const int* act, const float* dv, int n_act,
                 int64_t lo, int64_t hi) {
  const int64_t base = lo / W * W;
  vf mx = splat(kNegInf);
  int64_t j = base;
  if (n_act > 0) {
    for (; j + 4 * W <= hi; j += 4 * W) {
      vf a0 = ld(sh + j), a1 = ld(sh + j + W), a2 = ld(sh + j + 2 * W), a3 = ld(sh + j + 3 * W);
      for (int i = 0; i < n_act; ++i) {
        const float* r = kt + (int64_t)act[i] * n_pad + j;
        const vf s = splat(dv[i]);
        a0 += s * ld(r);
        a1 += s * ld(r + W);
        a2 += s * ld(r + 2 * W);
        a3 += s * ld(r + 3 * W);
      }
      st(sh + j, a0);
      st(sh + j + W, a1);
      st(sh + j + 2 * W, a2);
      st(sh + j + 3 * W, a3);
    }
    for (; j < hi; j += W) {  // the tail may run past hi: those keys are near, their sh is rewritten later
      vf a0 = ld(sh + j);
      for (int i = 0; i < n_act; ++i) a0 += splat(dv[i]) * ld(kt + (int64_t)act[i] * n_pad + j);
      st(sh + j, a0);
    }
  }
  for (j = base; j < hi; j += W) {
    vf v = ld(sh + j);
    if (j < lo || j + W > hi) v = in_range(j, lo, hi) ? v : splat(kNegInf);
    mx = vmax(mx, v);
  }
  return hmax(mx);
}

// out[j] = exp(s[j] - c) over [lo, hi) (vector-aligned superset written); returns the sum over [lo, hi).
float exp_range(const float* s, float* out, float c, int64_t lo, int64_t hi) {
  vf sum = splat(0.f);
  const vf cv = splat(c);
  for (int64_t j = lo / W * W; j < hi; j += W) {
    vf w = vexp(ld(s + j) - cv);
    if (j < lo || j + W > hi) w = in_range(j, lo, hi) ? w : splat(0.f);
    st(out + j, w);
    sum += w;
  }
  return hsum(sum);
}

void head(dl_head_args* a) {
  const int64_t T = a->t, N = a->n, D = a->d, NP = a->n_pad, P = N - T;
  const int64_t win = a->window, sinks = a->sinks;
  const float scale = a->scale, thq = a->theta_q, thv = a->theta_v;
  float* sh = a->scratch;  // far scores (scaled)
  float* wh = sh + NP;     // weights last applied (units of c)
  float* wb = wh + NP;     // current far weights
  float* nb = wb + NP;     // near scores, then near weights
  float* qh = nb + NP;     // transmitted query
  float* U = qh + D;       // sum_far wh_j v_j
  float* O = U + D;        // near accumulation
  float* qs = O + D;       // scaled query row (exact part)
  int act[kMaxDim];
  float dv[kMaxDim];
  memset(sh, 0, sizeof(float) * (size_t)(4 * NP));

  bool have_q = false, have_c = false;
  float c = 0.f, zh = 0.f;
  memset(U, 0, sizeof(float) * (size_t)D);
  int64_t fe = sinks;  // far keys known to the state: [sinks, fe)
  if (a->state_in && a->state_in[0] != 0.f) {
    const float* s = a->state_in;
    c = s[1];
    zh = s[2];
    const int64_t ns = (int64_t)s[3];
    memcpy(qh, s + 4, sizeof(float) * (size_t)D);
    memcpy(U, s + 4 + D, sizeof(float) * (size_t)D);
    const float* rows = s + DL_STATE_HEADER(D);
    memcpy(sh, rows, sizeof(float) * (size_t)ns);
    memcpy(wh, rows + ns, sizeof(float) * (size_t)ns);
    have_q = have_c = true;
    const int64_t last = P - 1;  // position of the last row the state has seen
    fe = last - win + 1 > sinks ? last - win + 1 : sinks;
  }

  int64_t dense = 0, qk = 0, pv = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t p = P + t;
    const float* qt = a->q + t * D;
    int64_t fe_new = p - win + 1 > sinks ? p - win + 1 : sinks;  // far keys this row: [sinks, fe_new)
    if (fe_new > p + 1) fe_new = p + 1;
    if (fe_new < fe) fe_new = fe;

    // 1. query delta
    int n_act = 0;
    if (!have_q) {
      memcpy(qh, qt, sizeof(float) * (size_t)D);
      have_q = true;
      n_act = (int)D;  // nothing far is known yet: costs nothing below
    } else {
      for (int64_t d = 0; d < D; ++d) {
        const float diff = qt[d] - qh[d];
        if (fabsf(diff) > thq) {
          act[n_act] = (int)d;
          dv[n_act] = diff * scale;
          qh[d] = qt[d];
          ++n_act;
        }
      }
    }
    for (int64_t d = 0; d < D; ++d) qs[d] = qt[d] * scale;

    // 2. old far keys: incremental update over the active dims
    const int64_t n_old = fe > sinks ? fe - sinks : 0;
    float m = kNegInf;
    if (n_old > 0) m = update_far(sh, a->kt, NP, act, dv, n_act, sinks, fe);
    // 3. keys that became far at this row: full dot with qh
    const int64_t new_lo = fe > sinks ? fe : sinks;
    for (int64_t j = new_lo; j < fe_new; ++j) {
      sh[j] = scale * dot(qh, a->k + j * D, D);
      m = sh[j] > m ? sh[j] : m;
    }
    // 4. near keys: sinks and window, exact
    const int64_t sink_hi = sinks < p + 1 ? sinks : p + 1;
    for (int64_t j = 0; j < sink_hi; ++j) {
      nb[j] = dot(qs, a->k + j * D, D);
      m = nb[j] > m ? nb[j] : m;
    }
    const int64_t ws = fe_new > sink_hi ? fe_new : sink_hi;  // window keys [ws, p]
    if (ws <= p) {
      const int64_t base = ws / W * W;
      for (int64_t j = base; j <= p; j += W) {
        vf acc = splat(0.f);
        for (int64_t d = 0; d < D; ++d) acc += splat(qs[d]) * ld(a->kt + d * NP + j);
        // lanes below ws hold far/sink keys: keep their values
        vf old = ld(nb + j);
        vi keep = in_range(j, ws, p + 1);
        st(nb + j, keep ? acc : old);
        m = fmaxf(m, hmax(keep ? acc : splat(kNegInf)));
      }
    }

    // 5. softmax reference
    if (!have_c) {
      c = m;
      have_c = true;
    } else if (m > c + kRebase || m < c - kRebase) {
      const float f = sexp(c - m);
      for (int64_t d = 0; d < D; ++d) U[d] *= f;
      zh *= f;
      for (int64_t j = sinks; j < fe; ++j) wh[j] *= f;
      c = m;
    }

    // 6. weights
    const float zf = fe_new > sinks ? exp_range(sh, wb, c, sinks, fe_new) : 0.f;
    float zn = 0.f;
    for (int64_t j = 0; j < sink_hi; ++j) {
      nb[j] = sexp(nb[j] - c);
      zn += nb[j];
    }
    if (ws <= p) {
      // exp in place over [ws, p]; the vector-aligned superset may cover far/sink lanes: keep them
      for (int64_t j = ws / W * W; j <= p; j += W) {
        vf v = ld(nb + j);
        vi keep = in_range(j, ws, p + 1);
        vf e = vexp(v - splat(c));
        st(nb + j, keep ? e : v);
        zn += hsum(keep ? e : splat(0.f));
      }
    }
    const float z = zf + zn;

    // 7. value side, far keys
    int64_t n_upd = 0;
    if (n_old > 0) {
      const vf lim = splat(thv * z);
      for (int64_t j0 = sinks / W * W; j0 < fe; j0 += W) {
        const vf w = ld(wb + j0), o = ld(wh + j0);
        const vf diff = w - o;
        vi moved = vabs(diff) > lim;
        if (j0 < sinks || j0 + W > fe) moved &= in_range(j0, sinks, fe);
        uint32_t mb = bits(moved);
        if (!mb) continue;
        st(wh + j0, moved ? w : o);
        while (mb) {
          const int i = __builtin_ctz(mb);
          mb &= mb - 1;
          axpy(U, diff[i], a->v + (j0 + i) * D, D);
          zh += diff[i];
          ++n_upd;
        }
      }
    }
    for (int64_t j = new_lo; j < fe_new; ++j) {
      axpy(U, wb[j], a->v + j * D, D);
      zh += wb[j];
      wh[j] = wb[j];
    }
    // near keys
    for (int64_t d = 0; d < D; ++d) O[d] = U[d];
    for (int64_t j = 0; j < sink_hi; ++j) axpy(O, nb[j], a->v + j * D, D);
    for (int64_t j = ws; j <= p; ++j) axpy(O, nb[j], a->v + j * D, D);
    const float inv = 1.f / (zh + zn);
    float* yt = a->y + t * D;
    for (int64_t d = 0; d < D; ++d) yt[d] = O[d] * inv;

    const int64_t n_new = fe_new - new_lo;
    const int64_t n_near = sink_hi + (ws <= p ? p - ws + 1 : 0);
    dense += 2 * D * (p + 1);
    qk += (n_near + n_new) * D + (int64_t)(n_old > 0 ? n_act : 0) * n_old;
    pv += (n_near + n_new) * D + n_upd * D;
    fe = fe_new;
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
    memcpy(s + 4, qh, sizeof(float) * (size_t)D);
    memcpy(s + 4 + D, U, sizeof(float) * (size_t)D);
    float* rows = s + DL_STATE_HEADER(D);
    memcpy(rows, sh, sizeof(float) * (size_t)N);
    memcpy(rows + N, wh, sizeof(float) * (size_t)N);
  }
}

}  // namespace

extern "C" const dl_table DL_TABLE_NAME = {DL_ISA_NAME, W, head, transpose};
