// Vectorised fused activations for kernel epilogues (any vector width).
// Accuracy: exp ~2 ulp; erf absolute error < 2e-7 (Abramowitz & Stegun 7.1.26
// rational form), so gelu is the exact (erf) GELU to fp32 tolerance.
#ifndef EDGESPARSE_ES_ACTIVATION_H
#define EDGESPARSE_ES_ACTIVATION_H

#include "es_kernels.h"
#include "es_simd.h"

namespace ES_NS {

template <class V>
ES_INLINE V vexp(V x) {
  typedef typename VecTraits<V>::I I;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  x = vmin(vmax(x, vset1<V>(-87.0f)), vset1<V>(88.0f));
  V t = x * 1.44269504088896341f + magic;
  V n = t - magic;
  // r = x - n ln2 in two parts so the reduction stays exact
  V r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-06f;
  // Taylor series of e^r on |r| <= ln2/2, degree 6 (error ~1e-7 relative)
  V p = r * (1.0f / 720.0f) + (1.0f / 120.0f);
  p = p * r + (1.0f / 24.0f);
  p = p * r + (1.0f / 6.0f);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  I ni = vbits(t) - vbits(vset1<V>(magic));
  V scale = vfrombits<V>((ni + 127) << 23);
  return p * scale;
}

template <class V>
ES_INLINE V vsilu(V x) {
  return x / (vexp(-x) + 1.0f);
}

template <class V>
ES_INLINE V verf(V z) {
  typedef typename VecTraits<V>::I I;
  I sign = vbits(z) & (int32_t)0x80000000;
  V a = vfrombits<V>(vbits(z) & 0x7fffffff);
  V t = 1.0f / (a * 0.3275911f + 1.0f);
  V poly = t * 1.061405429f - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  poly = poly * t;
  V y = 1.0f - poly * vexp(-(a * a));
  return vfrombits<V>(vbits(y) | sign);
}

template <class V>
ES_INLINE V vgelu(V x) {
  return 0.5f * x * (1.0f + verf(x * 0.70710678118654752f));
}

template <class V>
ES_INLINE V vactivate(V x, int act) {
  switch (act) {
    case ES_ACT_RELU:
      return vmax(x, vzero<V>());
    case ES_ACT_RELU6:
      return vmin(vmax(x, vzero<V>()), vset1<V>(6.0f));
    case ES_ACT_GELU:
      return vgelu(x);
    case ES_ACT_SILU:
      return vsilu(x);
    default:
      return x;
  }
}

}  // namespace ES_NS

#endif
