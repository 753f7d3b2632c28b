// Test driver for the pure kernels compiled to wasm32-wasi + SIMD128, run by node:wasi.
//   driver <cases.bin> <out.bin>
// cases.bin: int32 count, then per case int32[8] {m, k, n, block, activation, nnzb, has_bias, 0}
// followed by x[m*k] f32, values[nnzb*block] f32, k_index[nnzb] i32, row_ptr[nb+1] i32,
// bias[n] f32 (if has_bias). out.bin: per case an int32 status (0 ok, 1 rejected by
// es_bsmm_validate) and, when ok, y[m*n] f32 from es_bsmm_f32. stdout: the ISA and one line per
// rejected case with es_bsmm_validate's message.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "es_kernels.h"

static void* read_exact(FILE* f, size_t bytes) {
  void* p = malloc(bytes ? bytes : 1);
  if (!p || fread(p, 1, bytes, f) != bytes) {
    fprintf(stderr, "driver: short read\n");
    exit(2);
  }
  return p;
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: driver cases.bin out.bin\n");
    return 2;
  }
  FILE* in = fopen(argv[1], "rb");
  FILE* out = fopen(argv[2], "wb");
  if (!in || !out) {
    fprintf(stderr, "driver: cannot open files\n");
    return 2;
  }
  printf("isa %s vec_floats %d\n", es_kernels()->isa, es_kernels()->vec_floats);
  int32_t count;
  if (fread(&count, 4, 1, in) != 1) return 2;
  for (int32_t c = 0; c < count; ++c) {
    int32_t h[8];
    if (fread(h, 4, 8, in) != 8) return 2;
    const int64_t m = h[0], k = h[1], n = h[2], nnzb = h[5];
    const int32_t block = h[3];
    const int64_t nb = block > 0 ? (n + block - 1) / block : 0;
    float* x = (float*)read_exact(in, sizeof(float) * (size_t)(m * k));
    float* values = (float*)read_exact(in, sizeof(float) * (size_t)(nnzb * block));
    int32_t* k_index = (int32_t*)read_exact(in, sizeof(int32_t) * (size_t)nnzb);
    int32_t* row_ptr = (int32_t*)read_exact(in, sizeof(int32_t) * (size_t)(nb + 1));
    float* bias = h[6] ? (float*)read_exact(in, sizeof(float) * (size_t)n) : NULL;
    int64_t max_k = 0;
    const char* problem = es_bsmm_validate(nnzb, block, n, k, k_index, row_ptr, nb + 1, &max_k);
    int32_t status = problem ? 1 : 0;
    fwrite(&status, 4, 1, out);
    if (problem) {
      printf("case %d rejected: %s\n", (int)c, problem);
    } else {
      float* y = (float*)malloc(sizeof(float) * (size_t)(m * n + 1));
      for (int64_t i = 0; i < m * n; ++i) y[i] = -12345.0f;  // every output must be written
      es_bsmm_args a = {x, m, k, n, block, h[4], values, k_index, row_ptr, bias, y};
      es_bsmm_f32(&a);
      fwrite(y, sizeof(float), (size_t)(m * n), out);
      free(y);
    }
    free(x);
    free(values);
    free(k_index);
    free(row_ptr);
    free(bias);
  }
  fclose(out);
  return 0;
}
