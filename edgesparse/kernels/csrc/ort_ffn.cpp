// ORT glue for com.edgesparse::GatheredFFN (activation sparsity).
//
// Inputs: X float [..., D], experts int32 [n_active] (runtime selection),
// w_up float [E, D, S], w_gate float [E, D, S] (ignored when gated = 0; pass
// w_up again), w_down float [E, S, D_out], b_up float [E, S], b_gate float
// [E, S], b_down float [D_out]. Attributes: gated (int, 0), activation
// ("none"|"relu"|"gelu"|"silu"). Output Y float [..., D_out].
//
// com.edgesparse::RoutedFFN (BlockFFN-style routers) has the same inputs except
// input 1: routes float [..., E] (one row per token of X). Y is the full FFN
// with expert e's activated h scaled by routes[t, e]; the tokens are cut into
// chunks of `chunk` consecutive tokens (attribute, 0: one chunk) and only the
// experts with a nonzero route for some token of a chunk are computed there,
// which is exact (the others contribute zero).
#include <algorithm>
#include <cstring>

#include "ort_common.h"
#include "ort_ops.h"

namespace es_ort {
namespace {

struct FfnWeights {
  const float *w_up = nullptr, *w_gate = nullptr, *w_down = nullptr;
  const float *b_up = nullptr, *b_gate = nullptr, *b_down = nullptr;
  int64_t e = 0, d = 0, s = 0, d_out = 0;
};

FfnWeights check_weights(const TensorView* t, bool gated) {
  FfnWeights w;
  expect(t[2], "w_up (input 2)", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {-1, -1, -1});
  w.e = t[2].shape[0];
  w.d = t[2].shape[1];
  w.s = t[2].shape[2];
  expect(t[3], "w_gate (input 3)", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {w.e, w.d, w.s});
  expect(t[4], "w_down (input 4)", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {w.e, w.s, -1});
  w.d_out = t[4].shape[2];
  expect(t[5], "b_up (input 5)", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {w.e, w.s});
  expect(t[6], "b_gate (input 6)", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {w.e, w.s});
  expect(t[7], "b_down (input 7)", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {w.d_out});
  if (w.s % 4 != 0 || w.s == 0) throw NodeError("expert size S (w_up.shape[2]) must be a positive multiple of 4");
  if (w.d_out % 4 != 0) throw NodeError("D_out (w_down.shape[2]) must be a multiple of 4");
  w.w_up = t[2].as<float>();
  w.w_gate = gated ? t[3].as<float>() : nullptr;
  w.w_down = t[4].as<float>();
  w.b_up = t[5].as<float>();
  w.b_gate = gated ? t[6].as<float>() : nullptr;
  w.b_down = t[7].as<float>();
  return w;
}

struct FfnKernel {
  std::string where;
  bool routed = false;  // RoutedFFN: input 1 is routes float [..., E]
  int64_t chunk = 0;    // RoutedFFN: tokens per chunk (0: all)
  bool gated = false;
  int activation = ES_ACT_NONE;
  bool constant = false;
  FfnWeights weights;
  const es_kernel_table* table = es_kernels();

  FfnKernel(const OrtKernelInfo* info, bool routed_op) : routed(routed_op) {
    where = std::string(routed ? "RoutedFFN" : "GatheredFFN") + " node '" + node_name(info) + "'";
    if (routed) {
      chunk = attr_int_or(info, "chunk", 0);
      if (chunk < 0) throw NodeError("attribute chunk must be >= 0");
    }
    const int64_t g = attr_int_or(info, "gated", 0);
    if (g != 0 && g != 1) throw NodeError("attribute gated must be 0 or 1");
    gated = g == 1;
    activation = activation_code(attr_string_or(info, "activation", "none"), false, true);
    ONNXTensorElementDataType t;
    std::vector<int64_t> s;
    if (input_type(info, 0, &t, &s) && t != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      throw NodeError(std::string("X (input 0) must be float, got ") + dtype_name(t));
    if (!routed && input_type(info, 1, &t, &s) && t != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32)
      throw NodeError(std::string("experts (input 1) must be int32, got ") + dtype_name(t));
    if (routed && input_type(info, 1, &t, &s) && t != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      throw NodeError(std::string("routes (input 1) must be float, got ") + dtype_name(t));
    TensorView views[8];
    bool all = true;
    for (size_t i = 2; i < 8; ++i) all = constant_input(info, i, &views[i]) && all;
    if (all) {
      weights = check_weights(views, gated);
      constant = true;
      std::vector<int64_t> xs;
      if (input_type(info, 0, &t, &xs) && !xs.empty() && xs.back() >= 0 && xs.back() != weights.d)
        throw NodeError("X has " + std::to_string(xs.back()) + " features but w_up expects D=" +
                        std::to_string(weights.d));
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* c) {
    return guarded(where, [&] {
      Ort::KernelContext ctx(c);
      compute(ctx);
    });
  }

  void compute(Ort::KernelContext& ctx) {
    TensorView in[8];
    for (size_t i = 0; i < 2; ++i)
      if (!context_input(ctx, i, &in[i])) throw NodeError("missing input " + std::to_string(i));
    FfnWeights w = weights;
    if (!constant) {
      for (size_t i = 2; i < 8; ++i)
        if (!context_input(ctx, i, &in[i])) throw NodeError("missing input " + std::to_string(i));
      w = check_weights(in, gated);
    }
    const TensorView& x = in[0];
    if (x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || x.shape.empty() || x.shape.back() != w.d)
      throw NodeError("X must be float [..., D=" + std::to_string(w.d) + "], got " + shape_str(x.shape));
    if (routed) return compute_routed(ctx, in[0], in[1], w);
    const TensorView& ex = in[1];
    if (ex.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 || ex.shape.size() != 1)
      throw NodeError("experts must be a 1-D int32 tensor, got " + std::string(dtype_name(ex.type)) + " " +
                      shape_str(ex.shape));
    const int32_t* experts = ex.as<int32_t>();
    for (int64_t i = 0; i < ex.shape[0]; ++i)
      if (experts[i] < 0 || experts[i] >= w.e)
        throw NodeError("experts[" + std::to_string(i) + "]=" + std::to_string(experts[i]) + " is outside [0, " +
                        std::to_string(w.e) + ")");
    std::vector<int64_t> yshape(x.shape);
    yshape.back() = w.d_out;
    auto y = ctx.GetOutput(0, yshape);
    int64_t t = 1;  // product of the leading dims
    for (size_t i = 0; i + 1 < x.shape.size(); ++i) t *= x.shape[i];
    if (t == 0) return;

    es_gffn_args a = args(w, x.as<float>(), t, y.GetTensorMutableData<float>());
    a.n_active = ex.shape[0];
    a.experts = experts;
    run(ctx, a);
  }

  // The fields both ops fill the same way: weights, sizes, activation, X and Y.
  es_gffn_args args(const FfnWeights& w, const float* x, int64_t t, float* y) const {
    es_gffn_args a{};
    a.x = x;
    a.t = t;
    a.d = w.d;
    a.d_out = w.d_out;
    a.s = w.s;
    a.e_total = w.e;
    a.activation = activation;
    a.w_up = w.w_up;
    a.w_gate = w.w_gate;
    a.w_down = w.w_down;
    a.b_up = w.b_up;
    a.b_gate = w.b_gate;
    a.b_down = w.b_down;
    a.y = y;
    return a;
  }

  // RoutedFFN: per chunk, the experts with a nonzero route for some token, then the gathered
  // FFN over that chunk with h scaled by the routes.
  void compute_routed(Ort::KernelContext& ctx, const TensorView& x, const TensorView& r, const FfnWeights& w) {
    int64_t t = 1;  // product of the leading dims
    for (size_t i = 0; i + 1 < x.shape.size(); ++i) t *= x.shape[i];
    int64_t rt = 1;
    for (size_t i = 0; i + 1 < r.shape.size(); ++i) rt *= r.shape[i];
    if (r.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || r.shape.empty() || r.shape.back() != w.e || rt != t)
      throw NodeError("routes must be float [..., E=" + std::to_string(w.e) + "] with one row per token of X (" +
                      std::to_string(t) + "), got " + shape_str(r.shape));
    std::vector<int64_t> yshape(x.shape);
    yshape.back() = w.d_out;
    auto y = ctx.GetOutput(0, yshape);
    if (t == 0) return;
    const float* routes = r.as<float>();
    const int64_t step = chunk > 0 ? chunk : t;
    std::vector<int32_t> active;
    active.reserve((size_t)w.e);
    for (int64_t c0 = 0; c0 < t; c0 += step) {
      const int64_t c1 = std::min(t, c0 + step);
      active.clear();
      for (int64_t e = 0; e < w.e; ++e)
        for (int64_t k = c0; k < c1; ++k)
          if (routes[k * w.e + e] != 0.0f) {
            active.push_back((int32_t)e);
            break;
          }
      es_gffn_args a = args(w, x.as<float>() + c0 * w.d, c1 - c0, y.GetTensorMutableData<float>() + c0 * w.d_out);
      a.n_active = (int64_t)active.size();
      a.experts = active.data();
      a.scales = routes + c0 * w.e;
      run(ctx, a);
    }
  }

  void run(Ort::KernelContext& ctx, const es_gffn_args& a) {
    const es_kernel_table* tb = table;
    float* scratch = scratch_floats((size_t)tb->gffn_scratch(&a));
    const int64_t tm = tb->gffn_tile_m();
    const int64_t tiles = (a.t + tm - 1) / tm;
    tb->gffn_pack(&a, scratch, 0, a.t);

    // Phase 1: token tiles x active experts.
    const double up_work = (double)a.t * a.n_active * a.s * a.d * (a.w_gate ? 2 : 1);
    const int64_t up_chunks = chunk_count(up_work);
    const int64_t e_parts = std::max<int64_t>(1, std::min<int64_t>(a.n_active, up_chunks));
    const int64_t t_parts_up = std::min<int64_t>(tiles, std::max<int64_t>(1, up_chunks / e_parts));
    auto up = [&](size_t i) {
      const int64_t e = (int64_t)i % e_parts, s = (int64_t)i / e_parts;
      tb->gffn_up(&a, scratch, tiles * s / t_parts_up * tm, std::min(a.t, tiles * (s + 1) / t_parts_up * tm),
                  a.n_active * e / e_parts, a.n_active * (e + 1) / e_parts);
    };
    if (a.n_active > 0) parallel_for(ctx, (size_t)(e_parts * t_parts_up), up);

    // Phase 2: token tiles x panels of 16 output columns.
    const int64_t panels = (a.d_out + 15) / 16;
    const double down_work = (double)a.t * a.n_active * a.s * a.d_out + (double)a.t * a.d_out;
    const int64_t down_chunks = chunk_count(down_work);
    const int64_t n_parts = std::max<int64_t>(1, std::min<int64_t>(panels, down_chunks));
    const int64_t t_parts = std::min<int64_t>(tiles, std::max<int64_t>(1, down_chunks / n_parts));
    auto down = [&](size_t i) {
      const int64_t n = (int64_t)i % n_parts, s = (int64_t)i / n_parts;
      tb->gffn_down(&a, scratch, tiles * s / t_parts * tm, std::min(a.t, tiles * (s + 1) / t_parts * tm),
                    std::min(a.d_out, panels * n / n_parts * 16), std::min(a.d_out, panels * (n + 1) / n_parts * 16));
    };
    parallel_for(ctx, (size_t)(n_parts * t_parts), down);
  }
};

struct FfnOp : Ort::CustomOpBase<FfnOp, FfnKernel, true> {
  bool routed;
  explicit FfnOp(bool routed_op) : routed(routed_op) {}
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    FfnKernel* k = nullptr;
    OrtStatusPtr st = guarded(std::string(GetName()) + " node '" + node_name(info) + "'",
                              [&] { k = new FfnKernel(info, routed); });
    *kernel = k;
    return st;
  }
  const char* GetName() const { return routed ? "RoutedFFN" : "GatheredFFN"; }
  size_t GetInputTypeCount() const { return 8; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* gathered_ffn_op() {
  static FfnOp op(false);
  return &op;
}

const OrtCustomOp* routed_ffn_op() {
  static FfnOp op(true);
  return &op;
}

}  // namespace es_ort
