// Test driver for the block-sparse convolution and the gathered FFN of the pure kernels, compiled
// to wasm32-wasi + SIMD128 and run by node:wasi.   driver <cases.bin> <out.bin>
// cases.bin: int32 count, then per case int32[20] h with h[0] the op:
//   1 conv: h = {1, batch, cin, H, W, cout, kh, kw, sh, sw, dh, dw, pad_top, pad_left, oh, ow,
//                block, activation, nnzb, has_bias}
//           then x[batch*cin*H*W], values[nnzb*kh*kw*block], c_index[nnzb], row_ptr[nb+1], bias[cout]?
//   2 gffn: h = {2, t, d, d_out, s, e_total, n_active, activation, gated, 0...}
//           then x[t*d], w_up[e*d*s], w_gate[e*d*s] (gated), w_down[e*s*d_out], b_up[e*s],
//           b_gate[e*s] (gated), b_down[d_out], experts[n_active]
// out.bin: per case the output floats (conv [batch, cout, oh, ow], gffn [t, d_out]).
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "es_kernels.h"

static FILE* in;

static void* take(size_t bytes) {
  void* p = malloc(bytes ? bytes : 1);
  if (!p || fread(p, 1, bytes, in) != bytes) {
    fprintf(stderr, "driver: short read\n");
    exit(2);
  }
  return p;
}

static float* floats(int64_t n) { return (float*)take(sizeof(float) * (size_t)n); }

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  in = fopen(argv[1], "rb");
  FILE* out = fopen(argv[2], "wb");
  if (!in || !out) return 2;
  int32_t count;
  if (fread(&count, 4, 1, in) != 1) return 2;
  for (int32_t c = 0; c < count; ++c) {
    int32_t h[20];
    if (fread(h, 4, 20, in) != 20) return 2;
    if (h[0] == 1) {
      es_bsconv_args a = {};
      a.batch = h[1], a.cin = h[2], a.h = h[3], a.w = h[4], a.cout = h[5], a.kh = h[6], a.kw = h[7];
      a.stride_h = h[8], a.stride_w = h[9], a.dil_h = h[10], a.dil_w = h[11];
      a.pad_top = h[12], a.pad_left = h[13], a.oh = h[14], a.ow = h[15];
      a.block = h[16], a.activation = h[17];
      const int64_t nnzb = h[18], nb = (a.cout + a.block - 1) / a.block;
      float* x = floats(a.batch * a.cin * a.h * a.w);
      float* values = floats(nnzb * a.kh * a.kw * a.block);
      int32_t* c_index = (int32_t*)take(4 * (size_t)nnzb);
      int32_t* row_ptr = (int32_t*)take(4 * (size_t)(nb + 1));
      float* bias = h[19] ? floats(a.cout) : NULL;
      const int64_t ny = a.batch * a.cout * a.oh * a.ow;
      float* y = (float*)malloc(sizeof(float) * (size_t)(ny + 1));
      for (int64_t i = 0; i < ny; ++i) y[i] = -12345.0f;
      a.x = x, a.values = values, a.c_index = c_index, a.row_ptr = row_ptr, a.bias = bias, a.y = y;
      es_bsconv_f32(&a);
      fwrite(y, sizeof(float), (size_t)ny, out);
      free(x), free(values), free(c_index), free(row_ptr), free(bias), free(y);
    } else if (h[0] == 2) {
      es_gffn_args a;
      a.t = h[1], a.d = h[2], a.d_out = h[3], a.s = h[4], a.e_total = h[5], a.n_active = h[6];
      a.activation = h[7], a._pad = 0, a.scales = NULL;
      const int gated = h[8];
      const int64_t e = a.e_total;
      float* x = floats(a.t * a.d);
      float* w_up = floats(e * a.d * a.s);
      float* w_gate = gated ? floats(e * a.d * a.s) : NULL;
      float* w_down = floats(e * a.s * a.d_out);
      float* b_up = floats(e * a.s);
      float* b_gate = gated ? floats(e * a.s) : NULL;
      float* b_down = floats(a.d_out);
      int32_t* experts = (int32_t*)take(4 * (size_t)a.n_active);
      float* y = (float*)malloc(sizeof(float) * (size_t)(a.t * a.d_out + 1));
      for (int64_t i = 0; i < a.t * a.d_out; ++i) y[i] = -12345.0f;
      a.x = x, a.w_up = w_up, a.w_gate = w_gate, a.w_down = w_down, a.b_up = b_up, a.b_gate = b_gate;
      a.b_down = b_down, a.experts = experts, a.y = y;
      es_gffn_f32(&a);
      fwrite(y, sizeof(float), (size_t)(a.t * a.d_out), out);
      free(x), free(w_up), free(w_gate), free(w_down), free(b_up), free(b_gate), free(b_down), free(experts), free(y);
    } else {
      fprintf(stderr, "driver: unknown op %d\n", (int)h[0]);
      return 2;
    }
  }
  fclose(out);
  return 0;
}
