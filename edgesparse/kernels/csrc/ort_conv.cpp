// ORT glue for com.edgesparse::BlockSparseConv (NCHW Conv2d, group = 1) and
// BlockSparseConvAdd (the same plus a required input 5, residual [N, O, OH, OW], added after the
// activation: a conv followed by a residual Add in one node).
//
// Inputs: X float [N, C, H, W] (or NCHW16c [N, C/16, H, W, 16]), values float [nnzb, kh*kw, B],
// c_index int32 [nnzb], row_ptr int32 [ceil(O/B)+1], bias float [O] (optional).
// Attributes: out_channels (int, required), kernel_shape [kh, kw] (required),
// strides [2] (1,1), pads [4] (top, left, bottom, right; 0), dilations [2]
// (1,1), activation ("none"|"relu"|"relu6"|"silu"), group (must be 1), x_channel_block (1: X
// NCHW; 16: X NCHW16c), y_channel_block (the same for Y and the residual). NCHW16c on either side:
// 1x1, stride 1, no padding, B = 16.
#include <algorithm>
#include <cstring>

#include "ort_common.h"
#include "ort_ops.h"

namespace es_ort {
namespace {

struct ConvWeights {
  const float* values = nullptr;
  const int32_t* c_index = nullptr;
  const int32_t* row_ptr = nullptr;
  int64_t nnzb = 0;
  int32_t block = 0;
  int64_t max_c = 0;
  std::vector<uint8_t> used;  // input channels read by some block
};

ConvWeights check_weights(const TensorView& values, const TensorView& c_index, const TensorView& row_ptr,
                          int64_t cout, int64_t taps, int64_t cin) {
  expect(values, "values (input 1)", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {-1, taps, -1});
  ConvWeights w;
  w.nnzb = values.shape[0];
  w.block = (int32_t)values.shape[2];
  expect(c_index, "c_index (input 2)", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, {w.nnzb});
  expect(row_ptr, "row_ptr (input 3)", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, {-1});
  if (w.block != 4 && w.block != 8 && w.block != 16)
    throw NodeError("values must be [nnzb, kh*kw, B] with B in {4, 8, 16}, got shape " + shape_str(values.shape));
  if (row_ptr.shape[0] < 1) throw NodeError("row_ptr is empty");
  w.values = values.as<float>();
  w.c_index = c_index.as<int32_t>();
  w.row_ptr = row_ptr.as<int32_t>();
  const char* err = es_bsmm_validate(w.nnzb, w.block, cout, cin, w.c_index, w.row_ptr, row_ptr.shape[0], &w.max_c);
  if (err) {
    std::string msg = err;
    for (auto [from, to] : {std::pair<std::string, std::string>{"k_index", "c_index"}, {"N must", "out_channels must"},
                            {"K (input features)", "C (input channels)"}, {"ceil(N", "ceil(out_channels"}}) {
      size_t at = msg.find(from);
      if (at != std::string::npos) msg.replace(at, from.size(), to);
    }
    throw NodeError("malformed block-sparse weights: " + msg);
  }
  w.used.assign((size_t)w.max_c, 0);
  for (int64_t p = 0; p < w.nnzb; ++p) w.used[(size_t)w.c_index[p]] = 1;
  return w;
}

struct ConvKernel {
  std::string where;
  int64_t cout = 0, kh = 0, kw = 0, sh = 1, sw = 1, dh = 1, dw = 1;
  int64_t pt = 0, pl = 0, pb = 0, pr = 0;
  int activation = ES_ACT_NONE;
  bool constant = false;
  ConvWeights weights;
  bool residual = false;
  int32_t x_block = 1, y_block = 1;
  const es_kernel_table* table = es_kernels();

  ConvKernel(const OrtKernelInfo* info, bool with_residual) : residual(with_residual) {
    where = std::string(with_residual ? "BlockSparseConvAdd" : "BlockSparseConv") + " node '" + node_name(info) + "'";
    if (!attr_int(info, "out_channels", &cout)) throw NodeError("missing required attribute out_channels");
    if (cout <= 0) throw NodeError("attribute out_channels must be positive");
    const auto ks = attr_ints_or(info, "kernel_shape", {});
    if (ks.size() != 2 || ks[0] <= 0 || ks[1] <= 0)
      throw NodeError("attribute kernel_shape must be two positive ints [kh, kw]");
    kh = ks[0];
    kw = ks[1];
    if (kh * kw > 256) throw NodeError("kernel_shape larger than 256 taps is not supported");
    const auto st = attr_ints_or(info, "strides", {1, 1});
    const auto di = attr_ints_or(info, "dilations", {1, 1});
    const auto pa = attr_ints_or(info, "pads", {0, 0, 0, 0});
    if (st.size() != 2 || st[0] < 1 || st[1] < 1) throw NodeError("attribute strides must be two ints >= 1");
    if (di.size() != 2 || di[0] < 1 || di[1] < 1) throw NodeError("attribute dilations must be two ints >= 1");
    if (pa.size() != 4 || *std::min_element(pa.begin(), pa.end()) < 0)
      throw NodeError("attribute pads must be four ints >= 0 (top, left, bottom, right)");
    if (attr_int_or(info, "group", 1) != 1) throw NodeError("only group = 1 is supported");
    sh = st[0];
    sw = st[1];
    dh = di[0];
    dw = di[1];
    pt = pa[0];
    pl = pa[1];
    pb = pa[2];
    pr = pa[3];
    activation = activation_code(attr_string_or(info, "activation", "none"), true, false);
    x_block = channel_block_attr(info, "x_channel_block");
    y_block = channel_block_attr(info, "y_channel_block");
    if (y_block == 16 && cout % 16) throw NodeError("y_channel_block 16 needs out_channels a multiple of 16");

    ONNXTensorElementDataType xt;
    std::vector<int64_t> xshape;
    int64_t cin = -1;
    if (input_type(info, 0, &xt, &xshape)) {
      if (xt != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        throw NodeError(std::string("X (input 0) must be float, got ") + dtype_name(xt));
      if (!xshape.empty()) {
        const ImageDims d = image_dims(xshape, "X");
        if (d.c >= 0 && xshape[1] >= 0) cin = d.c;
      }
    }
    TensorView v, ci, rp;
    if (constant_input(info, 1, &v) && constant_input(info, 2, &ci) && constant_input(info, 3, &rp)) {
      weights = check_weights(v, ci, rp, cout, kh * kw, cin);
      constant = true;
    } else {
      ONNXTensorElementDataType t;
      std::vector<int64_t> s;
      if (input_type(info, 1, &t, &s) && t != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        throw NodeError(std::string("values (input 1) must be float, got ") + dtype_name(t));
      for (size_t i : {2, 3})
        if (input_type(info, i, &t, &s) && t != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32)
          throw NodeError(std::string(i == 2 ? "c_index" : "row_ptr") + " must be int32, got " + dtype_name(t));
    }
    if (input_type(info, 4, &xt, &xshape) && xt != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      throw NodeError(std::string("bias (input 4) must be float, got ") + dtype_name(xt));
    if (residual && input_type(info, 5, &xt, &xshape) && xt != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      throw NodeError(std::string("residual (input 5) must be float, got ") + dtype_name(xt));
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
    const ImageDims xd = image_dims(x.shape, "X");
    if (xd.block != x_block)
      throw NodeError("X " + shape_str(x.shape) + " is not in the layout of x_channel_block " + std::to_string(x_block));
    const int64_t n = xd.n, cin = xd.c, h = xd.h, w = xd.w;
    ConvWeights local;
    const ConvWeights* wt = &weights;
    if (!constant) {
      TensorView v, ci, rp;
      if (!context_input(ctx, 1, &v) || !context_input(ctx, 2, &ci) || !context_input(ctx, 3, &rp))
        throw NodeError("missing weight inputs");
      local = check_weights(v, ci, rp, cout, kh * kw, cin);
      wt = &local;
    }
    if (wt->max_c > cin)
      throw NodeError("c_index refers to input channel " + std::to_string(wt->max_c - 1) + " but X has C=" +
                      std::to_string(cin) + " channels");
    const float* bias = nullptr;
    TensorView b;
    if (context_input(ctx, 4, &b) && b.numel() > 0) {
      if (b.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || b.numel() != cout)
        throw NodeError("bias must be float with out_channels=" + std::to_string(cout) + " elements");
      bias = b.as<float>();
    }
    const int64_t oh = (h + pt + pb - dh * (kh - 1) - 1) / sh + 1;
    const int64_t ow = (w + pl + pr - dw * (kw - 1) - 1) / sw + 1;
    if (h + pt + pb < dh * (kh - 1) + 1 || w + pl + pr < dw * (kw - 1) + 1)
      throw NodeError("input " + shape_str(x.shape) + " is smaller than the dilated kernel");
    const bool blocked = xd.block > 1 || y_block > 1;
    if (blocked && (kh != 1 || kw != 1 || sh != 1 || sw != 1 || pt || pl || pb || pr || wt->block != 16))
      throw NodeError("the NCHW16c layout needs a 1x1 kernel, stride 1, no padding and 16 x 1 blocks");
    ImageDims yd;
    yd.n = n, yd.c = cout, yd.h = oh, yd.w = ow, yd.block = y_block;
    const float* res = nullptr;
    if (residual) {
      TensorView r;
      if (!context_input(ctx, 5, &r)) throw NodeError("missing input residual");
      const std::vector<int64_t> want = yd.shape();
      if (r.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || r.shape != want)
        throw NodeError("residual must be float " + shape_str(want) + " (the output's shape), got " + shape_str(r.shape));
      res = r.as<float>();
    }
    auto y = ctx.GetOutput(0, yd.shape());
    if (n == 0 || oh * ow == 0) return;

    es_bsconv_args a{};
    a.x = x.as<float>();
    a.batch = n;
    a.cin = cin;
    a.h = h;
    a.w = w;
    a.cout = cout;
    a.kh = kh;
    a.kw = kw;
    a.stride_h = sh;
    a.stride_w = sw;
    a.dil_h = dh;
    a.dil_w = dw;
    a.pad_top = pt;
    a.pad_left = pl;
    a.oh = oh;
    a.ow = ow;
    a.block = wt->block;
    a.activation = activation;
    a.values = wt->values;
    a.c_index = wt->c_index;
    a.row_ptr = wt->row_ptr;
    a.bias = bias;
    a.y = y.GetTensorMutableData<float>();
    a.residual = res;
    a.x_block = xd.block;
    a.y_block = y_block;
    run(ctx, a, *wt);
  }

  void run(Ort::KernelContext& ctx, const es_bsconv_args& a, const ConvWeights& wt) {
    const es_kernel_table* t = table;
    // NCHW16c (either side; 1x1, stride 1): positions are h*w, split in multiples of 42 (every
    // ISA's register tile divides it), no prepared input.
    const bool blocked = a.x_block > 1 || a.y_block > 1;
    const int64_t nb = (a.cout + a.block - 1) / a.block;
    const int64_t positions = blocked ? a.h * a.w : t->bsconv_positions(&a);
    const int64_t tile = blocked ? 42 : t->bsconv_tile(a.block);
    const int64_t tiles = (positions + tile - 1) / tile;
    const int64_t prep_floats = blocked ? 0 : t->bsconv_prepared_floats(&a);
    float* prep = prep_floats ? scratch_floats((size_t)prep_floats) : nullptr;
    // `used` covers channels [0, max_c); channels beyond are never read.
    std::vector<uint8_t> used(wt.used);
    used.resize((size_t)a.cin, 0);

    const double work = (double)positions * (double)a.row_ptr[nb] * a.kh * a.kw * a.block;
    // Coarser than the other ops (chunk_count's ~32K multiply-adds per chunk): every chunk walks
    // its block rows' weights again, and on the sample CNN's 1x1 layers at 70 % (64-512 channels,
    // 7x7-28x28) 8x larger chunks ran 1.5-3 % faster at 1 and at 2 threads (2026-11-29).
    const int64_t chunks = chunk_count(work / 8);
    const int64_t q_parts = std::min<int64_t>(tiles, chunks);
    const std::vector<int64_t> rows = split_rows(a.row_ptr, nb, std::max<int64_t>(1, chunks / q_parts));
    const int64_t row_parts = (int64_t)rows.size() - 1;

    for (int64_t img = 0; img < a.batch; ++img) {
      if (prep) {
        const int64_t cparts = std::min<int64_t>(a.cin, std::max<int64_t>(1, chunks / 4));
        auto prepare = [&](size_t i) {
          const int64_t c0 = a.cin * (int64_t)i / cparts, c1 = a.cin * ((int64_t)i + 1) / cparts;
          t->bsconv_prepare(&a, prep, img, c0, c1, used.data());
        };
        parallel_for(ctx, (size_t)cparts, prepare);
      }
      auto body = [&](size_t i) {
        const int64_t r = (int64_t)i % row_parts, s = (int64_t)i / row_parts;
        const int64_t q0 = tiles * s / q_parts * tile, q1 = std::min(positions, tiles * (s + 1) / q_parts * tile);
        if (blocked)
          t->bsconv16_range(&a, img, q0, q1, rows[r], rows[r + 1]);
        else
          t->bsconv_range(&a, prep, img, q0, q1, rows[r], rows[r + 1]);
      };
      parallel_for(ctx, (size_t)(q_parts * row_parts), body);
    }
  }
};

template <bool Residual>
struct ConvOp : Ort::CustomOpBase<ConvOp<Residual>, ConvKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    ConvKernel* k = nullptr;
    OrtStatusPtr st = guarded(std::string(GetName()) + " node '" + node_name(info) + "'",
                              [&] { k = new ConvKernel(info, Residual); });
    *kernel = k;
    return st;
  }
  const char* GetName() const { return Residual ? "BlockSparseConvAdd" : "BlockSparseConv"; }
  size_t GetInputTypeCount() const { return Residual ? 6 : 5; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 4 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* block_sparse_conv_op() {
  static ConvOp<false> op;
  return &op;
}

const OrtCustomOp* block_sparse_conv_add_op() {
  static ConvOp<true> op;
  return &op;
}

}  // namespace es_ort
