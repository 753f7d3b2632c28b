// Thin portable SIMD layer over GCC/Clang vector extensions.
//
// One source set serves every ISA: the build compiles kernels_isa.cpp once per
// ISA variant with one of the macros below, and each copy lives in its own
// namespace (ES_NS) so the copies never merge at link time (an AVX-512
// instantiation must not be picked for an AVX2-only CPU).
//
//   ES_ISA_AVX512  64-byte vectors (16 floats), 32 registers
//   ES_ISA_AVX2    32-byte vectors (8 floats), 16 registers (+FMA)
//   (none)         16-byte vectors (4 floats): SSE2, NEON, wasm SIMD128
//
// Vectors are always used at the native width: a prototype with 64-byte
// vectors in an AVX2 build ran 6x slower because GCC splits them through the
// stack. Narrower vectors (for blocks smaller than the native width) are fine.
//
// Plain C headers only: this file must compile for wasm32-wasi without libc++.
#ifndef EDGESPARSE_ES_SIMD_H
#define EDGESPARSE_ES_SIMD_H

#include <stdint.h>
#include <string.h>

#if defined(ES_ISA_AVX512)
#define ES_NS es_avx512
#define ES_ISA_NAME "avx512"
#define ES_VEC_FLOATS 16
#define ES_NUM_VREGS 32
#elif defined(ES_ISA_AVX2)
#define ES_NS es_avx2
#define ES_ISA_NAME "avx2"
#define ES_VEC_FLOATS 8
#define ES_NUM_VREGS 16
#else
#define ES_NS es_generic
#define ES_ISA_NAME "generic"
#define ES_VEC_FLOATS 4
#if defined(__aarch64__)
#define ES_NUM_VREGS 32
#else
#define ES_NUM_VREGS 16
#endif
#endif

#define ES_INLINE inline __attribute__((always_inline))
#define ES_RESTRICT __restrict__

namespace ES_NS {

// Vector of L floats with matching int type and unaligned access types.
template <int L>
struct Vec;

#define ES_DEFINE_VEC(L)                                                                    \
  template <>                                                                               \
  struct Vec<L> {                                                                           \
    typedef float type __attribute__((vector_size(4 * L)));                                 \
    typedef int32_t itype __attribute__((vector_size(4 * L)));                              \
    typedef float utype __attribute__((vector_size(4 * L), aligned(4), may_alias));         \
    typedef int32_t uitype __attribute__((vector_size(4 * L), aligned(4), may_alias));      \
  };
ES_DEFINE_VEC(4)
#if ES_VEC_FLOATS >= 8
ES_DEFINE_VEC(8)
#endif
#if ES_VEC_FLOATS >= 16
ES_DEFINE_VEC(16)
#endif
#undef ES_DEFINE_VEC

// Lanes used for a run of B contiguous floats: the native width, or B if smaller.
template <int B>
struct Lanes {
  static constexpr int L = B < ES_VEC_FLOATS ? B : ES_VEC_FLOATS;
  static constexpr int R = B / L;  // vectors per run
  typedef typename Vec<L>::type V;
};

// The native vector.
typedef Vec<ES_VEC_FLOATS>::type vfloat;

template <class V>
struct VecTraits;
#define ES_TRAITS(L)                                 \
  template <>                                        \
  struct VecTraits<typename Vec<L>::type> {          \
    static constexpr int lanes = L;                  \
    typedef typename Vec<L>::itype I;                \
    typedef typename Vec<L>::utype U;                \
  };
ES_TRAITS(4)
#if ES_VEC_FLOATS >= 8
ES_TRAITS(8)
#endif
#if ES_VEC_FLOATS >= 16
ES_TRAITS(16)
#endif
#undef ES_TRAITS

template <class V>
ES_INLINE V vload(const float* p) {
  return *reinterpret_cast<const typename VecTraits<V>::U*>(p);
}
template <class V>
ES_INLINE void vstore(float* p, V v) {
  *reinterpret_cast<typename VecTraits<V>::U*>(p) = v;
}
template <class V>
ES_INLINE V vset1(float s) {
  V v = {};
  return v + s;
}
template <class V>
ES_INLINE V vzero() {
  V v = {};
  return v;
}

// Bit casts and a branch-free select (works for GCC and Clang in C++ and for
// every vector width; compilers turn it into blend/max instructions).
template <class V>
ES_INLINE typename VecTraits<V>::I vbits(V v) {
  return (typename VecTraits<V>::I)v;
}
template <class V>
ES_INLINE V vfrombits(typename VecTraits<V>::I i) {
  return (V)i;
}
template <class V>
ES_INLINE V vselect(typename VecTraits<V>::I mask, V a, V b) {
  return vfrombits<V>((mask & vbits(a)) | (~mask & vbits(b)));
}
template <class V>
ES_INLINE V vmax(V a, V b) {
  return vselect<V>(a > b, a, b);
}
template <class V>
ES_INLINE V vmin(V a, V b) {
  return vselect<V>(a < b, a, b);
}

// Even and odd elements of the 2 * lanes floats at p (stride-2 deinterleave).
#if defined(__clang__)
#define ES_EVEN4 0, 2, 4, 6
#define ES_EVEN8 ES_EVEN4, 8, 10, 12, 14
#define ES_EVEN16 ES_EVEN8, 16, 18, 20, 22, 24, 26, 28, 30
#define ES_ODD4 1, 3, 5, 7
#define ES_ODD8 ES_ODD4, 9, 11, 13, 15
#define ES_ODD16 ES_ODD8, 17, 19, 21, 23, 25, 27, 29, 31
#define ES_CAT2(a, b) a##b
#define ES_CAT(a, b) ES_CAT2(a, b)
ES_INLINE void vdeinterleave(const float* p, vfloat& even, vfloat& odd) {
  const vfloat a = vload<vfloat>(p), b = vload<vfloat>(p + ES_VEC_FLOATS);
  even = __builtin_shufflevector(a, b, ES_CAT(ES_EVEN, ES_VEC_FLOATS));
  odd = __builtin_shufflevector(a, b, ES_CAT(ES_ODD, ES_VEC_FLOATS));
}
#else
ES_INLINE void vdeinterleave(const float* p, vfloat& even, vfloat& odd) {
  typedef Vec<ES_VEC_FLOATS>::itype I;
  I ie, io;
  for (int k = 0; k < ES_VEC_FLOATS; ++k) {
    ie[k] = 2 * k;
    io[k] = 2 * k + 1;
  }
  const vfloat a = vload<vfloat>(p), b = vload<vfloat>(p + ES_VEC_FLOATS);
  even = __builtin_shuffle(a, b, ie);
  odd = __builtin_shuffle(a, b, io);
}
#endif

// Partial load/store of n < lanes floats (tails), through a small buffer.
template <class V>
ES_INLINE V vload_partial(const float* p, int n) {
  float buf[VecTraits<V>::lanes] = {};
  memcpy(buf, p, sizeof(float) * (size_t)n);
  return vload<V>(buf);
}
template <class V>
ES_INLINE void vstore_partial(float* p, V v, int n) {
  float buf[VecTraits<V>::lanes];
  vstore<V>(buf, v);
  memcpy(p, buf, sizeof(float) * (size_t)n);
}

// 4 x 4 transpose: the 4 floats at src + i * ls (i < 4) become column i of the
// 4 rows at dst + j * ld. 4 loads, 8 shuffles and 4 stores where a scalar copy
// takes 16 loads and 16 stores (bsmm_pack: 2 cycles per float scalar).
ES_INLINE void vtranspose4(const float* src, int64_t ls, float* dst, int64_t ld) {
  typedef Vec<4>::type V4;
  const V4 r0 = vload<V4>(src), r1 = vload<V4>(src + ls), r2 = vload<V4>(src + 2 * ls), r3 = vload<V4>(src + 3 * ls);
#if defined(__clang__)
#define ES_SHUF4(a, b, i0, i1, i2, i3) __builtin_shufflevector(a, b, i0, i1, i2, i3)
#else
#define ES_SHUF4(a, b, i0, i1, i2, i3) __builtin_shuffle(a, b, (Vec<4>::itype){i0, i1, i2, i3})
#endif
  const V4 t0 = ES_SHUF4(r0, r1, 0, 4, 1, 5), t1 = ES_SHUF4(r0, r1, 2, 6, 3, 7);  // a0 b0 a1 b1, a2 b2 a3 b3
  const V4 t2 = ES_SHUF4(r2, r3, 0, 4, 1, 5), t3 = ES_SHUF4(r2, r3, 2, 6, 3, 7);  // c0 d0 c1 d1, c2 d2 c3 d3
  vstore<V4>(dst, ES_SHUF4(t0, t2, 0, 1, 4, 5));
  vstore<V4>(dst + ld, ES_SHUF4(t0, t2, 2, 3, 6, 7));
  vstore<V4>(dst + 2 * ld, ES_SHUF4(t1, t3, 0, 1, 4, 5));
  vstore<V4>(dst + 3 * ld, ES_SHUF4(t1, t3, 2, 3, 6, 7));
#undef ES_SHUF4
}

#if ES_VEC_FLOATS >= 8
// 8 x 8 transpose in 8-float vectors (unpack, shuffle, 128-bit lane swap: 24
// shuffles and 8 stores per 64 floats where vtranspose4 takes 32 and 16).
ES_INLINE void vtranspose8(const float* src, int64_t ls, float* dst, int64_t ld) {
  typedef Vec<8>::type V8;
  V8 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = vload<V8>(src + i * ls);
#if defined(__clang__)
#define ES_SHUF8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define ES_SHUF8(a, b, ...) __builtin_shuffle(a, b, (Vec<8>::itype){__VA_ARGS__})
#endif
  for (int i = 0; i < 8; i += 2) {
    t[i] = ES_SHUF8(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = ES_SHUF8(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = ES_SHUF8(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = ES_SHUF8(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = ES_SHUF8(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = ES_SHUF8(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i = 0; i < 4; ++i) {
    vstore<V8>(dst + i * ld, ES_SHUF8(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11));
    vstore<V8>(dst + (i + 4) * ld, ES_SHUF8(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15));
  }
#undef ES_SHUF8
}
#endif

// Packs tc token rows of x (row stride k) as dst[kk * tc + t] (the kernels' token
// tiles: the tc inputs of one feature share a cache line). In slices of 64
// features so the slice's destination (64 x tc floats) stays in L1 (row by row
// over all of K, 3072 x 48 tokens took half the time of a 90 % sparse M = 64
// call), 4 x 4 at a time in registers (a float at a time took 2 cycles: 24 of the
// ~80 us of a 75 % sparse 384 x 384 projection at M = 128; 8 x 8 where vectors
// are 8 floats or wider).
ES_INLINE void pack_token_tile(const float* x, int64_t k, int64_t tc, float* dst) {
  for (int64_t k0 = 0; k0 < k; k0 += 64) {
    const int64_t k1 = k - k0 < 64 ? k : k0 + 64;
    int64_t t = 0;
#if ES_VEC_FLOATS >= 8
    for (; t + 8 <= tc; t += 8) {
      const float* xr = x + t * k;
      int64_t kk = k0;
      for (; kk + 8 <= k1; kk += 8) vtranspose8(xr + kk, k, dst + kk * tc + t, tc);
      for (; kk < k1; ++kk)
        for (int i = 0; i < 8; ++i) dst[kk * tc + t + i] = xr[i * k + kk];
    }
#endif
    for (; t + 4 <= tc; t += 4) {
      const float* xr = x + t * k;
      int64_t kk = k0;
      for (; kk + 4 <= k1; kk += 4) vtranspose4(xr + kk, k, dst + kk * tc + t, tc);
      for (; kk < k1; ++kk)
        for (int i = 0; i < 4; ++i) dst[kk * tc + t + i] = xr[i * k + kk];
    }
    for (; t < tc; ++t) {
      const float* xr = x + t * k;
      for (int64_t kk = k0; kk < k1; ++kk) dst[kk * tc + t] = xr[kk];
    }
  }
}

}  // namespace ES_NS

#endif
