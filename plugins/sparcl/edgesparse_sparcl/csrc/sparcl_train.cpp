// Training kernels for block-sparse layers: what the SparCL trainer runs in backward.
//
// Weights use the layouts of edgesparse's kernel library (see es_kernels.h): a
// block is B consecutive output channels x 1 input channel (x all kh*kw taps for
// a convolution), packed as values [nnzb, taps, B], c_index [nnzb] (input
// channel of each block) and row_ptr [ceil(O/B) + 1].
//
// Forward runs the kernel library's own code through its function table (the
// caller passes es_kernels()); this file adds what the library does not have:
//
//   conv_dx   dX = W^T * dY, a transposed convolution that reads only the kept
//             blocks, any stride/padding/dilation (phase planes, see below);
//   conv_dw   dW on kept blocks only (a sampled dense-dense product), optionally
//             restricted further to a list of units (block p, lane b) for
//             dynamic gradient masking;
//   linear_dx / linear_dw: the same for Y = X W with W [K, N].
//
// Geometry (shared with conv_forward's input layout, reimplemented here so that
// this file does not depend on the library's private layouts): the input of one
// image is rewritten into zero-padded phase planes
//     P[c][a][b][i][j] = Xpad[c][i*sh + a][j*sw + b],   i < hh, j < wh,
// so that tap t of output position q = oy*wh + ox reads P[c] at toff[t] + q.
// Columns ox >= ow of the virtual grid are garbage; the gradient dY is laid out
// on the same grid with those columns zero, which makes every sum over the grid
// exact. Work is split over images, one std::thread per extra thread.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <thread>
#include <vector>

#include "es_kernels.h"

#if defined(__AVX512F__)
#define SP_L 16
#elif defined(__AVX2__)
#define SP_L 8
#else
#define SP_L 4
#endif

#define SP_API extern "C" __attribute__((visibility("default")))

namespace {

typedef float vf __attribute__((vector_size(4 * SP_L)));
typedef float vfu __attribute__((vector_size(4 * SP_L), aligned(4), may_alias));

inline vf vload(const float* p) { return *(const vfu*)p; }
inline void vstore(float* p, vf v) { *(vfu*)p = v; }
inline vf vzero() { return vf{} ; }
inline float hsum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < SP_L; ++i) s += v[i];
  return s;
}

template <class F>
void parallel_for(int nthreads, int64_t count, F fn) {
  // fn(worker, begin, end) over contiguous chunks of [0, count)
  int workers = (int)std::min<int64_t>(std::max(1, nthreads), std::max<int64_t>(count, 1));
  if (workers <= 1) {
    fn(0, (int64_t)0, count);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (int w = 1; w < workers; ++w) {
    const int64_t b = count * w / workers, e = count * (w + 1) / workers;
    pool.emplace_back([=] { fn(w, b, e); });
  }
  fn(0, (int64_t)0, count / workers);
  for (auto& t : pool) t.join();
}

}  // namespace

extern "C" {

typedef struct sp_conv {
  int64_t batch, cin, h, w;
  int64_t cout, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow;
  int32_t block, nthreads;
  const float* values;     // [nnzb, taps, B]
  const int32_t* c_index;  // [nnzb]
  const int32_t* row_ptr;  // [nb + 1]
  int64_t nnzb;
  const int32_t* blk_row;  // [nnzb] block row of each block
  const int32_t* t_ptr;    // [cin + 1] blocks of input channel c: t_blk[t_ptr[c] .. t_ptr[c+1])
  const int32_t* t_blk;    // [nnzb]
} sp_conv;

}  // extern "C"

namespace {

struct Geom {
  int64_t hh, wh, plane, cs, cs_pad, q, qv, taps;
  std::vector<int64_t> toff;  // offset of tap t in the prepared input of one channel
};

Geom geom(const sp_conv* g) {
  Geom m;
  m.hh = g->oh + ((g->kh - 1) * g->dh) / g->sh;
  m.wh = g->ow + ((g->kw - 1) * g->dw) / g->sw;
  m.plane = m.hh * m.wh;
  m.cs = g->sh * g->sw * m.plane;
  m.q = g->oh * m.wh;
  m.qv = (m.q + SP_L - 1) / SP_L * SP_L;
  m.cs_pad = m.cs + m.wh + 4 * SP_L + 64;  // reads of the last vector run past the planes
  m.taps = g->kh * g->kw;
  m.toff.resize((size_t)m.taps);
  for (int64_t ky = 0; ky < g->kh; ++ky)
    for (int64_t kx = 0; kx < g->kw; ++kx) {
      const int64_t ry = ky * g->dh, rx = kx * g->dw;
      const int64_t ph = (ry % g->sh) * g->sw + rx % g->sw;
      m.toff[(size_t)(ky * g->kw + kx)] = ph * m.plane + (ry / g->sh) * m.wh + rx / g->sw;
    }
  return m;
}

// Phase planes of channel c of image n into dst (cs floats).
void prepare_planes(const sp_conv* g, const Geom& m, const float* x, int64_t n, int64_t c, float* dst) {
  const float* xc = x + (n * g->cin + c) * g->h * g->w;
  for (int64_t a = 0; a < g->sh; ++a)
    for (int64_t b = 0; b < g->sw; ++b) {
      float* plane = dst + (a * g->sw + b) * m.plane;
      for (int64_t i = 0; i < m.hh; ++i) {
        float* row = plane + i * m.wh;
        const int64_t y = i * g->sh + a - g->pt;
        if (y < 0 || y >= g->h) {
          memset(row, 0, sizeof(float) * (size_t)m.wh);
          continue;
        }
        const float* src = xc + y * g->w;
        for (int64_t j = 0; j < m.wh; ++j) {
          const int64_t xcol = j * g->sw + b - g->pl;
          row[j] = (xcol >= 0 && xcol < g->w) ? src[xcol] : 0.0f;
        }
      }
    }
}

}  // namespace

extern "C" {

// Y = conv(X, W) (+ bias) on the kernel library's own code; images split over threads.
SP_API void sp_conv_forward(const es_kernel_table* t, const sp_conv* g, const float* x, const float* bias, float* y) {
  es_bsconv_args a;
  memset(&a, 0, sizeof(a));
  a.x = x;
  a.batch = g->batch;
  a.cin = g->cin;
  a.h = g->h;
  a.w = g->w;
  a.cout = g->cout;
  a.kh = g->kh;
  a.kw = g->kw;
  a.stride_h = g->sh;
  a.stride_w = g->sw;
  a.dil_h = g->dh;
  a.dil_w = g->dw;
  a.pad_top = g->pt;
  a.pad_left = g->pl;
  a.oh = g->oh;
  a.ow = g->ow;
  a.block = g->block;
  a.activation = ES_ACT_NONE;
  a.values = g->values;
  a.c_index = g->c_index;
  a.row_ptr = g->row_ptr;
  a.bias = bias;
  a.y = y;
  std::vector<uint8_t> used((size_t)g->cin, 0);
  for (int64_t p = 0; p < g->nnzb; ++p) used[(size_t)g->c_index[p]] = 1;
  const int64_t need = t->bsconv_prepared_floats(&a);
  const int64_t positions = t->bsconv_positions(&a);
  const int64_t nb = (g->cout + g->block - 1) / g->block;
  parallel_for(g->nthreads, g->batch, [&](int, int64_t n0, int64_t n1) {
    std::vector<float> prep((size_t)(need > 0 ? need : 1));
    for (int64_t n = n0; n < n1; ++n) {
      t->bsconv_prepare(&a, need ? prep.data() : nullptr, n, 0, g->cin, used.data());
      t->bsconv_range(&a, need ? prep.data() : nullptr, n, 0, positions, 0, nb);
    }
  });
}

// Backward of a block-sparse convolution, all images at once:
//   dx      [batch, cin, h, w] = transposed convolution of dY with the kept blocks (NULL: skip);
//   dvalues [nnzb, taps, B]    = gradient of the kept weights (NULL: skip); units (p*B + b),
//                                when not NULL, lists the (block, lane) pairs to compute, the
//                                others are set to zero.
// Every image gets a slot of `sigma` floats per channel in two "super-planes": dY on the virtual
// output grid and (for dW) X in phase planes, both starting `front` floats into the slot, zeros
// around them. One vector loop then runs over all images without per-image remainders, and the
// weight gradient needs one horizontal sum per (unit, tap) for the whole batch.
SP_API void sp_conv_backward(const sp_conv* g, const float* x, const float* dy, float* dx, const int32_t* units,
                             int64_t nunits, float* dvalues) {
  const Geom m = geom(g);
  const int B = g->block;
  const int64_t N = g->batch;
  int64_t front = 0;
  for (int64_t t = 0; t < m.taps; ++t) front = std::max(front, m.toff[(size_t)t] % m.plane);
  const int64_t sigma = front + std::max(m.cs, m.qv);
  const int64_t span = 8 * SP_L;
  const int64_t chan = N * sigma + sigma + span + 64;  // floats per channel, with end slack

  std::vector<int32_t> all;
  if (dvalues && !units) {
    all.reserve((size_t)(g->nnzb * B));
    for (int64_t p = 0; p < g->nnzb; ++p) {
      const int64_t j = g->blk_row[p];
      for (int b = 0; b < B && j * B + b < g->cout; ++b) all.push_back((int32_t)(p * B + b));
    }
    units = all.data();
    nunits = (int64_t)all.size();
  }
  std::vector<uint8_t> used_o((size_t)g->cout, 0), used_c((size_t)g->cin, 0);
  if (dx)
    for (int64_t p = 0; p < g->nnzb; ++p) {
      const int64_t j = g->blk_row[p];
      for (int64_t b = 0; b < B && j * B + b < g->cout; ++b) used_o[(size_t)(j * B + b)] = 1;
    }
  if (dvalues)
    for (int64_t u = 0; u < nunits; ++u) {
      const int64_t p = units[u] / B, b = units[u] % B;
      used_c[(size_t)g->c_index[p]] = 1;
      used_o[(size_t)(g->blk_row[p] * B + b)] = 1;
    }

  thread_local std::vector<float> dys_buf, xs_buf;
  if ((int64_t)dys_buf.size() < g->cout * chan) dys_buf.resize((size_t)(g->cout * chan));
  if (dvalues && (int64_t)xs_buf.size() < g->cin * chan) xs_buf.resize((size_t)(g->cin * chan));
  float* dys = dys_buf.data();
  float* xs = dvalues ? xs_buf.data() : nullptr;

  // 1. slots: dY (and X) of every image
  parallel_for(g->nthreads, N + 1, [&](int, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      if (n == N) {  // end slack
        for (int64_t o = 0; o < g->cout; ++o)
          if (used_o[(size_t)o]) memset(dys + o * chan + N * sigma, 0, sizeof(float) * (size_t)(chan - N * sigma));
        if (xs)
          for (int64_t c = 0; c < g->cin; ++c)
            if (used_c[(size_t)c]) memset(xs + c * chan + N * sigma, 0, sizeof(float) * (size_t)(chan - N * sigma));
        continue;
      }
      for (int64_t o = 0; o < g->cout; ++o) {
        if (!used_o[(size_t)o]) continue;
        float* slot = dys + o * chan + n * sigma;
        memset(slot, 0, sizeof(float) * (size_t)sigma);
        const float* src = dy + (n * g->cout + o) * g->oh * g->ow;
        for (int64_t oy = 0; oy < g->oh; ++oy)
          memcpy(slot + front + oy * m.wh, src + oy * g->ow, sizeof(float) * (size_t)g->ow);
      }
      if (xs)
        for (int64_t c = 0; c < g->cin; ++c) {
          if (!used_c[(size_t)c]) continue;
          float* slot = xs + c * chan + n * sigma;
          memset(slot, 0, sizeof(float) * (size_t)front);
          prepare_planes(g, m, x, n, c, slot + front);
          memset(slot + front + m.cs, 0, sizeof(float) * (size_t)(sigma - front - m.cs));
        }
    }
  });

  // 2. dX, input channels split over threads
  if (dx) {
    const int64_t nphase = g->sh * g->sw;
    std::vector<std::vector<int64_t>> ptaps((size_t)nphase), poffs((size_t)nphase);
    for (int64_t t = 0; t < m.taps; ++t) {
      const int64_t ph = m.toff[(size_t)t] / m.plane;
      ptaps[(size_t)ph].push_back(t);
      poffs[(size_t)ph].push_back(m.toff[(size_t)t] % m.plane);
    }
    const int64_t total = N * sigma;
    parallel_for(g->nthreads, g->cin, [&](int, int64_t c0, int64_t c1) {
      std::vector<float> out((size_t)(total + span + SP_L));
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t n = 0; n < N; ++n) memset(dx + (n * g->cin + c) * g->h * g->w, 0, sizeof(float) * (size_t)(g->h * g->w));
        const int64_t k0 = g->t_ptr[c], k1 = g->t_ptr[c + 1];
        if (k0 == k1) continue;
        for (int64_t a = 0; a < g->sh; ++a)
          for (int64_t bb = 0; bb < g->sw; ++bb) {
            const size_t ph = (size_t)(a * g->sw + bb);
            const int nt = (int)ptaps[ph].size();
            if (nt == 0) continue;
            const int64_t* taps = ptaps[ph].data();
            const int64_t* offs = poffs[ph].data();
            for (int64_t r0 = 0; r0 < total; r0 += span) {
              vf acc[8];
              for (int s = 0; s < 8; ++s) acc[s] = vzero();
              for (int64_t k = k0; k < k1; ++k) {
                const int64_t p = g->t_blk[k];
                const int64_t j = g->blk_row[p];
                const float* wv = g->values + p * m.taps * B;
                const int bmax = (int)std::min<int64_t>(B, g->cout - j * B);
                for (int b = 0; b < bmax; ++b) {
                  const float* src = dys + (j * B + b) * chan + front + r0;
                  for (int ti = 0; ti < nt; ++ti) {
                    const float w = wv[taps[ti] * B + b];
                    const float* s0 = src - offs[ti];
                    for (int s = 0; s < 8; ++s) acc[s] += w * vload(s0 + s * SP_L);
                  }
                }
              }
              for (int s = 0; s < 8; ++s) vstore(out.data() + r0 + s * SP_L, acc[s]);
            }
            // scatter the phase plane of every image back to rows/columns
            for (int64_t n = 0; n < N; ++n) {
              float* dxc = dx + (n * g->cin + c) * g->h * g->w;
              const float* plane = out.data() + n * sigma;
              for (int64_t i = 0; i < m.hh; ++i) {
                const int64_t y = i * g->sh + a - g->pt;
                if (y < 0 || y >= g->h) continue;
                const float* src = plane + i * m.wh;
                float* row = dxc + y * g->w;
                if (g->sw == 1) {
                  const int64_t j0 = std::max<int64_t>(0, g->pl - bb), j1 = std::min<int64_t>(m.wh, g->w + g->pl - bb);
                  if (j1 > j0) memcpy(row + j0 + bb - g->pl, src + j0, sizeof(float) * (size_t)(j1 - j0));
                } else {
                  for (int64_t jj = 0; jj < m.wh; ++jj) {
                    const int64_t xcol = jj * g->sw + bb - g->pl;
                    if (xcol >= 0 && xcol < g->w) row[xcol] = src[jj];
                  }
                }
              }
            }
          }
      }
    });
  }

  // 3. dW on the listed units, units split over threads
  if (dvalues) {
    memset(dvalues, 0, sizeof(float) * (size_t)(g->nnzb * m.taps * B));
    const int64_t taps = m.taps;
    parallel_for(g->nthreads, nunits, [&](int, int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t p = units[u] / B, b = units[u] % B;
        const float* xc = xs + (int64_t)g->c_index[p] * chan + front;
        const float* d = dys + (g->blk_row[p] * B + b) * chan + front;
        float* out = dvalues + p * taps * B + b;
        for (int64_t t0 = 0; t0 < taps; t0 += 9) {
          const int nt = (int)std::min<int64_t>(9, taps - t0);
          vf acc[9];
          int64_t off[9];
          for (int t = 0; t < 9; ++t) {
            acc[t] = vzero();
            off[t] = t < nt ? m.toff[(size_t)(t0 + t)] : 0;
          }
          for (int64_t n = 0; n < N; ++n) {
            const float* dn = d + n * sigma;
            const float* xn = xc + n * sigma;
            if (nt == 9) {
              for (int64_t q = 0; q < m.qv; q += SP_L) {
                const vf dv = vload(dn + q);
                for (int t = 0; t < 9; ++t) acc[t] += dv * vload(xn + off[t] + q);
              }
            } else {
              for (int64_t q = 0; q < m.qv; q += SP_L) {
                const vf dv = vload(dn + q);
                for (int t = 0; t < nt; ++t) acc[t] += dv * vload(xn + off[t] + q);
              }
            }
          }
          for (int t = 0; t < nt; ++t) out[(t0 + t) * B] = hsum(acc[t]);
        }
      }
    });
  }
}

// ---- Linear: Y [m, n] = X [m, k] W [k, n] -------------------------------------

SP_API void sp_linear_forward(const es_kernel_table* t, int64_t m, int64_t k, int64_t n, int32_t block,
                              const float* values, const int32_t* k_index, const int32_t* row_ptr, const float* x,
                              const float* bias, float* y, int32_t nthreads) {
  es_bsmm_args a;
  memset(&a, 0, sizeof(a));
  a.x = x;
  a.m = m;
  a.k = k;
  a.n = n;
  a.block = block;
  a.activation = ES_ACT_NONE;
  a.values = values;
  a.k_index = k_index;
  a.row_ptr = row_ptr;
  a.bias = bias;
  a.y = y;
  std::vector<float> xp;
  const float* packed = nullptr;
  if (m > 1) {
    xp.resize((size_t)(m * k + 16));
    if (t->bsmm_pack(&a, xp.data(), 0, m) == 0) packed = xp.data();
  }
  const int64_t nb = (n + block - 1) / block;
  parallel_for(nthreads, nb, [&](int, int64_t j0, int64_t j1) { t->bsmm_range(&a, packed, 0, m, j0, j1); });
}

// dX [m, k] = dY [m, n] W^T, reading only the kept blocks (t_ptr/t_blk: blocks by input feature).
SP_API void sp_linear_dx(int64_t m, int64_t k, int64_t n, int32_t block, const float* values, const int32_t* blk_row,
                         const int32_t* t_ptr, const int32_t* t_blk, const float* dy, float* dx, int32_t nthreads) {
  parallel_for(nthreads, m, [&](int, int64_t m0, int64_t m1) {
    for (int64_t r = m0; r < m1; ++r) {
      const float* d = dy + r * n;
      float* out = dx + r * k;
      for (int64_t kk = 0; kk < k; ++kk) {
        float s = 0.0f;
        for (int64_t i = t_ptr[kk]; i < t_ptr[kk + 1]; ++i) {
          const int64_t p = t_blk[i], j = blk_row[p];
          const float* w = values + p * block;
          const int bmax = (int)std::min<int64_t>(block, n - j * block);
          const float* dj = d + j * block;
          for (int b = 0; b < bmax; ++b) s += w[b] * dj[b];
        }
        out[kk] = s;
      }
    }
  });
}

// dvalues [nnzb, B] = kept-block gradient: sum over rows of X[:, k_p] * dY[:, jB:jB+B].
SP_API void sp_linear_dw(int64_t m, int64_t k, int64_t n, int32_t block, int64_t nnzb, const int32_t* k_index,
                         const int32_t* blk_row, const float* xt, const float* dy, float* dvalues, int32_t nthreads) {
  // xt is X transposed ([k, m]) so that a block's input column is contiguous.
  parallel_for(nthreads, nnzb, [&](int, int64_t p0, int64_t p1) {
    std::vector<float> acc((size_t)block);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t j = blk_row[p];
      const int bmax = (int)std::min<int64_t>(block, n - j * block);
      std::fill(acc.begin(), acc.end(), 0.0f);
      const float* xc = xt + (int64_t)k_index[p] * m;
      for (int64_t r = 0; r < m; ++r) {
        const float xv = xc[r];
        const float* d = dy + r * n + j * block;
        for (int b = 0; b < bmax; ++b) acc[(size_t)b] += xv * d[b];
      }
      for (int b = 0; b < block; ++b) dvalues[p * block + b] = acc[(size_t)b];
    }
  });
}

SP_API int sp_vector_floats(void) { return SP_L; }

}  // extern "C"
