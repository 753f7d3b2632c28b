// ORT glue for com.edgesparse::BlockSparseMatMul.
//
// Inputs: X float [..., K], values float [nnzb, B], k_index int32 [nnzb],
// row_ptr int32 [ceil(N/B)+1], bias float [N] (optional).
// Attributes: N (int, required), activation ("none"|"relu"|"gelu"|"silu").
// Weights that are constant initializers are validated once, when the session
// is created; otherwise at every run.
#include <algorithm>
#include <cstring>

#include "ort_common.h"
#include "ort_ops.h"

namespace es_ort {
namespace {

struct BsmmWeights {
  const float* values = nullptr;
  const int32_t* k_index = nullptr;
  const int32_t* row_ptr = nullptr;
  int64_t nnzb = 0;
  int32_t block = 0;
  int64_t max_k = 0;  // largest k_index + 1: X must have at least this many features
};

// Checks dtypes, shapes and the sparse structure; throws NodeError.
BsmmWeights check_weights(const TensorView& values, const TensorView& k_index, const TensorView& row_ptr,
                          int64_t n, int64_t k) {
  expect(values, "values (input 1)", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {-1, -1});
  BsmmWeights w;
  w.nnzb = values.shape[0];
  w.block = (int32_t)values.shape[1];
  expect(k_index, "k_index (input 2)", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, {w.nnzb});
  expect(row_ptr, "row_ptr (input 3)", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, {-1});
  if (w.block != 4 && w.block != 8 && w.block != 16)
    throw NodeError("values must be [nnzb, B] with B in {4, 8, 16}, got shape " + shape_str(values.shape));
  w.values = values.as<float>();
  w.k_index = k_index.as<int32_t>();
  w.row_ptr = row_ptr.as<int32_t>();
  if (row_ptr.shape[0] < 1) throw NodeError("row_ptr is empty");
  const char* err = es_bsmm_validate(w.nnzb, w.block, n, k, w.k_index, w.row_ptr, row_ptr.shape[0], &w.max_k);
  if (err) throw NodeError(std::string("malformed block-sparse weights: ") + err);
  return w;
}

struct BsmmKernel {
  std::string where;
  int64_t n = 0;
  int activation = ES_ACT_NONE;
  bool constant = false;
  BsmmWeights weights;
  const es_kernel_table* table = es_kernels();  // ISA chosen per session

  explicit BsmmKernel(const OrtKernelInfo* info) {
    where = "BlockSparseMatMul node '" + node_name(info) + "'";
    if (!attr_int(info, "N", &n)) throw NodeError("missing required attribute N");
    if (n <= 0) throw NodeError("attribute N must be positive");
    activation = activation_code(attr_string_or(info, "activation", "none"), false, true);

    ONNXTensorElementDataType xt;
    std::vector<int64_t> xshape;
    int64_t k = -1;
    if (input_type(info, 0, &xt, &xshape)) {
      if (xt != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        throw NodeError(std::string("X (input 0) must be float, got ") + dtype_name(xt));
      if (!xshape.empty() && xshape.back() >= 0) k = xshape.back();
    }
    TensorView v, ki, rp;
    const bool cv = constant_input(info, 1, &v), ck = constant_input(info, 2, &ki),
               cr = constant_input(info, 3, &rp);
    if (cv && ck && cr) {
      weights = check_weights(v, ki, rp, n, k);
      constant = true;
    } else {
      // Still reject what can be seen now: wrong element types.
      ONNXTensorElementDataType t;
      std::vector<int64_t> s;
      if (input_type(info, 1, &t, &s) && t != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        throw NodeError(std::string("values (input 1) must be float, got ") + dtype_name(t));
      if (input_type(info, 2, &t, &s) && t != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32)
        throw NodeError(std::string("k_index (input 2) must be int32, got ") + dtype_name(t));
      if (input_type(info, 3, &t, &s) && t != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32)
        throw NodeError(std::string("row_ptr (input 3) must be int32, got ") + dtype_name(t));
    }
    if (input_type(info, 4, &xt, &xshape) && xt != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      throw NodeError(std::string("bias (input 4) must be float, got ") + dtype_name(xt));
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* c) {
    return guarded(where, [&] {
      Ort::KernelContext ctx(c);
      compute(ctx);
    });
  }

  void compute(Ort::KernelContext& ctx) {
    TensorView x;
    if (!context_input(ctx, 0, &x)) throw NodeError("missing input X");
    if (x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw NodeError("X must be float");
    if (x.shape.empty()) throw NodeError("X must have rank >= 1");
    const int64_t k = x.shape.back();
    int64_t m = 1;  // product of the leading dims (not numel / K: K may be 0)
    for (size_t i = 0; i + 1 < x.shape.size(); ++i) m *= x.shape[i];

    BsmmWeights w = weights;
    if (!constant) {
      TensorView v, ki, rp;
      if (!context_input(ctx, 1, &v) || !context_input(ctx, 2, &ki) || !context_input(ctx, 3, &rp))
        throw NodeError("missing weight inputs");
      w = check_weights(v, ki, rp, n, k);
    }
    if (w.max_k > k)
      throw NodeError("k_index refers to input feature " + std::to_string(w.max_k - 1) + " but X has K=" +
                      std::to_string(k) + " features");
    const float* bias = nullptr;
    TensorView b;
    if (context_input(ctx, 4, &b) && b.numel() > 0) {
      if (b.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || b.numel() != n)
        throw NodeError("bias must be float with N=" + std::to_string(n) + " elements, got " +
                        dtype_name(b.type) + " " + shape_str(b.shape));
      bias = b.as<float>();
    }

    std::vector<int64_t> yshape(x.shape);
    yshape.back() = n;
    auto y = ctx.GetOutput(0, yshape);
    if (m == 0) return;
    float* yd = y.GetTensorMutableData<float>();

    es_bsmm_args a{};
    a.x = x.as<float>();
    a.m = m;
    a.k = k;
    a.n = n;
    a.block = w.block;
    a.activation = activation;
    a.values = w.values;
    a.k_index = w.k_index;
    a.row_ptr = w.row_ptr;
    a.bias = bias;
    a.y = yd;
    run(ctx, table, a);
  }

  static void run(Ort::KernelContext& ctx, const es_kernel_table* t, const es_bsmm_args& a) {
    const int64_t nb = (a.n + a.block - 1) / a.block;
    const int64_t tm = t->bsmm_tile(&a);
    const int64_t tiles = (a.m + tm - 1) / tm;

    float* xp = nullptr;
    if (a.m > 1) {
      xp = scratch_floats((size_t)(a.m * a.k));
      auto pack = [&](size_t i) { t->bsmm_pack(&a, xp, (int64_t)i * tm, std::min<int64_t>(a.m, ((int64_t)i + 1) * tm)); };
      const size_t pack_chunks = (a.m * a.k >= (1 << 16)) ? (size_t)tiles : 1;
      if (pack_chunks == 1)
        t->bsmm_pack(&a, xp, 0, a.m);
      else
        parallel_for(ctx, pack_chunks, pack);
    }

    // Work split: block rows first (each thread streams its own weights),
    // then token tiles when there are more chunks than rows.
    const double work = (double)a.m * (double)a.row_ptr[nb] * a.block + (double)a.m * a.n;
    const int64_t chunks = chunk_count(work);
    const std::vector<int64_t> rows = split_rows(a.row_ptr, nb, chunks);
    const int64_t row_parts = (int64_t)rows.size() - 1;
    const int64_t tok_parts = std::min<int64_t>(tiles, std::max<int64_t>(1, chunks / row_parts));
    auto body = [&](size_t i) {
      const int64_t r = (int64_t)i % row_parts, s = (int64_t)i / row_parts;
      const int64_t t0 = tiles * s / tok_parts, t1 = tiles * (s + 1) / tok_parts;
      t->bsmm_range(&a, xp, t0 * tm, std::min(a.m, t1 * tm), rows[r], rows[r + 1]);
    };
    parallel_for(ctx, (size_t)(row_parts * tok_parts), body);
  }
};

struct BsmmOp : Ort::CustomOpBase<BsmmOp, BsmmKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    BsmmKernel* k = nullptr;
    std::string where = "BlockSparseMatMul node '" + node_name(info) + "'";
    OrtStatusPtr st = guarded(where, [&] { k = new BsmmKernel(info); });
    *kernel = k;
    return st;
  }
  const char* GetName() const { return "BlockSparseMatMul"; }
  size_t GetInputTypeCount() const { return 5; }
  // Any element type is accepted by the schema so that a wrong one reaches our
  // own check, which names the node (ORT's message would not say what to fix).
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 4 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* block_sparse_matmul_op() {
  static BsmmOp op;
  return &op;
}

}  // namespace es_ort
