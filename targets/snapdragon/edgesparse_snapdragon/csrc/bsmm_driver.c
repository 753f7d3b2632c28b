/* Test driver for the pure kernels (es_kernels.h C ABI), cross-compiled for aarch64 and run under
 * qemu-aarch64-static by edgesparse_snapdragon.kernel_check (the ARM tests and instruction counts).
 *
 *   bsmm_driver CASES.esbt OUT.esbt [sparse|dense]
 *
 * CASES (ESBT tensor file, see es_run.c) holds groups of tensors, each opened by "meta", int64
 * [op, number of tensors that follow, parameters...]:
 *   op 0 BlockSparseMatMul: (m, k, n, block, activation, repeat); x, values, k_index, row_ptr, bias
 *   op 1 BlockSparseConv:   (batch, cin, h, w, cout, kh, kw, stride_h, stride_w, dil_h, dil_w,
 *                            pad_top, pad_left, oh, ow, block, activation); x, values, c_index, row_ptr, bias
 *   op 2 GatheredFFN:       (t, d, d_out, s, e_total, n_active, activation);
 *                            x, w_up, w_gate, w_down, b_up, b_gate, b_down, experts
 * A tensor with zero elements stands for NULL (no bias, plain FFN). For each case OUT gets "y", or,
 * when es_bsmm_validate rejects a matmul case, "error" (uint8 message).
 * "sparse" (the default) runs the es_*_f32 entry points; "dense" runs matmul cases through a
 * register-tiled dense loop on the unpacked weights (the reference of the instruction counts; no
 * activation). Each kernel call is bracketed by es_mark(1) and es_mark(2) so that a qemu exec
 * trace can count the instructions in between.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "es_kernels.h"

__attribute__((noinline, noipa)) void es_mark(int where) { __asm__ volatile("" ::"r"(where) : "memory"); }

typedef struct {
  char name[64];
  int32_t type;
  uint32_t rank;
  int64_t dims[4];
  int64_t count;
  void* data;
} Tensor;

static void fail(const char* msg) {
  fprintf(stderr, "bsmm_driver: %s\n", msg);
  exit(1);
}

static void get(FILE* f, void* p, size_t n) {
  if (n && fread(p, 1, n, f) != n) fail("truncated case file");
}

static int read_tensor(FILE* f, Tensor* t) {
  uint32_t len;
  get(f, &len, 4);
  if (len >= sizeof t->name) fail("name too long");
  get(f, t->name, len);
  t->name[len] = 0;
  get(f, &t->type, 4);
  get(f, &t->rank, 4);
  if (t->rank > 4) fail("rank above 4");
  get(f, t->dims, 8 * t->rank);
  t->count = 1;
  for (uint32_t i = 0; i < t->rank; ++i) t->count *= t->dims[i];
  size_t size = t->type == 7 ? 8 : 4; /* int64 : float / int32 */
  t->data = malloc((size_t)t->count * size + 16);
  get(f, t->data, (size_t)t->count * size);
  return 0;
}

static void put_tensor(FILE* f, const char* name, int32_t type, uint32_t rank, const int64_t* dims,
                       const void* data, size_t bytes) {
  uint32_t len = (uint32_t)strlen(name);
  fwrite(&len, 4, 1, f);
  fwrite(name, 1, len, f);
  fwrite(&type, 4, 1, f);
  fwrite(&rank, 4, 1, f);
  fwrite(dims, 8, rank, f);
  fwrite(data, 1, bytes, f);
}

/* The dense reference: y = x @ w + bias with a register-tiled NEON loop (4 tokens x 16 outputs per
 * tile: 16 accumulators, 4 weight vectors and one broadcast input per k), the structure of a
 * hand-written dense SGEMM micro-kernel. Columns past the last multiple of 16 run a scalar loop. */
typedef float v4f __attribute__((vector_size(16)));
typedef float v4u __attribute__((vector_size(16), aligned(4), may_alias));

#define DENSE_TILE(R)                                                                               \
  static void dense_tile##R(const float* x, int64_t k, const float* w, int64_t n, const float* bias, \
                            float* y, int64_t j0) {                                                 \
    v4f acc[R][4];                                                                                  \
    for (int r = 0; r < R; ++r)                                                                     \
      for (int c = 0; c < 4; ++c) acc[r][c] = bias ? (v4f)*(const v4u*)(bias + j0 + 4 * c) : (v4f){0}; \
    for (int64_t kk = 0; kk < k; ++kk) {                                                            \
      const float* wr = w + kk * n + j0;                                                            \
      v4f w0 = *(const v4u*)wr, w1 = *(const v4u*)(wr + 4), w2 = *(const v4u*)(wr + 8),             \
          w3 = *(const v4u*)(wr + 12);                                                              \
      for (int r = 0; r < R; ++r) {                                                                 \
        const float xv = x[r * k + kk];                                                             \
        acc[r][0] += w0 * xv; acc[r][1] += w1 * xv; acc[r][2] += w2 * xv; acc[r][3] += w3 * xv;     \
      }                                                                                             \
    }                                                                                               \
    for (int r = 0; r < R; ++r)                                                                     \
      for (int c = 0; c < 4; ++c) *(v4u*)(y + r * n + j0 + 4 * c) = acc[r][c];                      \
  }
DENSE_TILE(1)
DENSE_TILE(2)
DENSE_TILE(3)
DENSE_TILE(4)

__attribute__((noinline)) static void dense_matmul(const float* x, const float* w, const float* bias,
                                                   float* y, int64_t m, int64_t k, int64_t n) {
  const int64_t n16 = n / 16 * 16;
  for (int64_t i = 0; i < m; i += 4) {
    const int64_t rows = m - i < 4 ? m - i : 4;
    for (int64_t j0 = 0; j0 < n16; j0 += 16) {
      const float* xi = x + i * k;
      float* yi = y + i * n;
      if (rows == 4) dense_tile4(xi, k, w, n, bias, yi, j0);
      else if (rows == 3) dense_tile3(xi, k, w, n, bias, yi, j0);
      else if (rows == 2) dense_tile2(xi, k, w, n, bias, yi, j0);
      else dense_tile1(xi, k, w, n, bias, yi, j0);
    }
    for (int64_t r = i; r < i + rows; ++r)
      for (int64_t j = n16; j < n; ++j) {
        float s = bias ? bias[j] : 0.0f;
        for (int64_t kk = 0; kk < k; ++kk) s += x[r * k + kk] * w[kk * n + j];
        y[r * n + j] = s;
      }
  }
}

static void run_bsmm(FILE* out, const int64_t* meta, Tensor* t, int dense) {
  es_bsmm_args a;
  memset(&a, 0, sizeof a);
  a.m = meta[2]; a.k = meta[3]; a.n = meta[4];
  a.block = (int32_t)meta[5]; a.activation = (int32_t)meta[6];
  const int64_t repeat = meta[7] > 0 ? meta[7] : 1;
  a.x = (const float*)t[0].data;
  a.values = (const float*)t[1].data;
  a.k_index = (const int32_t*)t[2].data;
  a.row_ptr = (const int32_t*)t[3].data;
  a.bias = t[4].count ? (const float*)t[4].data : NULL;
  const char* err = es_bsmm_validate(t[2].count, a.block, a.n, a.k, a.k_index, a.row_ptr, t[3].count, NULL);
  if (err) {
    int64_t len = (int64_t)strlen(err);
    put_tensor(out, "error", 2, 1, &len, err, (size_t)len);
    return;
  }
  float* y = calloc((size_t)(a.m * a.n) + 1, sizeof(float));
  a.y = y;
  if (dense) {
    float* w = calloc((size_t)(a.k * a.n) + 1, sizeof(float));
    for (int64_t j = 0; j + 1 < t[3].count; ++j)
      for (int32_t p = a.row_ptr[j]; p < a.row_ptr[j + 1]; ++p)
        for (int b = 0; b < a.block && j * a.block + b < a.n; ++b)
          w[(int64_t)a.k_index[p] * a.n + j * a.block + b] = a.values[(int64_t)p * a.block + b];
    for (int64_t r = 0; r < repeat; ++r) {
      es_mark(1);
      dense_matmul(a.x, w, a.bias, y, a.m, a.k, a.n);
      es_mark(2);
    }
    free(w);
  } else {
    for (int64_t r = 0; r < repeat; ++r) {
      es_mark(1);
      es_bsmm_f32(&a);
      es_mark(2);
    }
  }
  int64_t dims[2] = {a.m, a.n};
  put_tensor(out, "y", 1, 2, dims, y, sizeof(float) * (size_t)(a.m * a.n));
  free(y);
}

static void run_bsconv(FILE* out, const int64_t* meta, Tensor* t) {
  es_bsconv_args a;
  memset(&a, 0, sizeof a);
  a.batch = meta[2]; a.cin = meta[3]; a.h = meta[4]; a.w = meta[5]; a.cout = meta[6];
  a.kh = meta[7]; a.kw = meta[8]; a.stride_h = meta[9]; a.stride_w = meta[10];
  a.dil_h = meta[11]; a.dil_w = meta[12]; a.pad_top = meta[13]; a.pad_left = meta[14];
  a.oh = meta[15]; a.ow = meta[16]; a.block = (int32_t)meta[17]; a.activation = (int32_t)meta[18];
  a.x = (const float*)t[0].data;
  a.values = (const float*)t[1].data;
  a.c_index = (const int32_t*)t[2].data;
  a.row_ptr = (const int32_t*)t[3].data;
  a.bias = t[4].count ? (const float*)t[4].data : NULL;
  const int64_t count = a.batch * a.cout * a.oh * a.ow;
  float* y = calloc((size_t)count + 1, sizeof(float));
  a.y = y;
  es_mark(1);
  es_bsconv_f32(&a);
  es_mark(2);
  int64_t dims[4] = {a.batch, a.cout, a.oh, a.ow};
  put_tensor(out, "y", 1, 4, dims, y, sizeof(float) * (size_t)count);
  free(y);
}

static void run_gffn(FILE* out, const int64_t* meta, Tensor* t) {
  es_gffn_args a;
  memset(&a, 0, sizeof a);
  a.t = meta[2]; a.d = meta[3]; a.d_out = meta[4]; a.s = meta[5]; a.e_total = meta[6];
  a.n_active = meta[7]; a.activation = (int32_t)meta[8];
  const float* f[7];
  for (int i = 0; i < 7; ++i) f[i] = t[i].count ? (const float*)t[i].data : NULL;
  a.x = f[0]; a.w_up = f[1]; a.w_gate = f[2]; a.w_down = f[3];
  a.b_up = f[4]; a.b_gate = f[5]; a.b_down = f[6];
  a.experts = (const int32_t*)t[7].data;
  const int64_t count = a.t * a.d_out;
  float* y = calloc((size_t)count + 1, sizeof(float));
  a.y = y;
  es_mark(1);
  es_gffn_f32(&a);
  es_mark(2);
  int64_t dims[2] = {a.t, a.d_out};
  put_tensor(out, "y", 1, 2, dims, y, sizeof(float) * (size_t)count);
  free(y);
}

int main(int argc, char** argv) {
  if (argc < 3) fail("usage: bsmm_driver CASES OUT [sparse|dense]");
  const int dense = argc > 3 && strcmp(argv[3], "dense") == 0;
  FILE* in = fopen(argv[1], "rb");
  if (!in) fail("cannot open the case file");
  char magic[4];
  uint32_t version, count;
  get(in, magic, 4);
  get(in, &version, 4);
  get(in, &count, 4);
  if (memcmp(magic, "ESBT", 4) || version != 1) fail("not a case file");
  /* first pass: count the cases (each opened by a meta tensor) */
  Tensor* all = calloc(count ? count : 1, sizeof(Tensor));
  uint32_t cases = 0;
  for (uint32_t i = 0; i < count; ++i) {
    read_tensor(in, &all[i]);
    if (strcmp(all[i].name, "meta") == 0) ++cases;
  }
  fclose(in);
  FILE* out = fopen(argv[2], "wb");
  if (!out) fail("cannot create the output file");
  fwrite("ESBT", 1, 4, out);
  fwrite(&version, 4, 1, out);
  fwrite(&cases, 4, 1, out);
  const es_kernel_table* table = es_kernels();
  fprintf(stderr, "bsmm_driver: kernel table '%s', %d floats per vector\n", table->isa, table->vec_floats);
  for (uint32_t i = 0; i < count;) {
    if (strcmp(all[i].name, "meta") != 0 || all[i].type != 7 || all[i].count < 2) fail("case without meta");
    const int64_t* meta = (const int64_t*)all[i].data;
    const int64_t n = meta[1], want[3] = {8, 19, 9}, tensors[3] = {5, 5, 8};
    if (meta[0] < 0 || meta[0] > 2 || all[i].count != want[meta[0]] || n != tensors[meta[0]] || i + 1 + n > count)
      fail("malformed meta");
    Tensor* t = all + i + 1;
    if (meta[0] == 0) run_bsmm(out, meta, t, dense);
    else if (meta[0] == 1) run_bsconv(out, meta, t);
    else run_gffn(out, meta, t);
    i += 1 + (uint32_t)n;
  }
  for (uint32_t i = 0; i < count; ++i) free(all[i].data);
  free(all);
  if (fclose(out)) fail("cannot write the output file");
  return 0;
}
