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

}  // namespace ES_NS

#endif
