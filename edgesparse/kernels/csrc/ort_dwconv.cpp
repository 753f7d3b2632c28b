// ORT glue for com.edgesparse::DepthwiseConv (NCHW, group = channels, dense weights).
//
// Inputs: X float [N, C, H, W] (or NCHW16c [N, C/16, H, W, 16]), W float [C, 1, kh, kw] (ONNX
// Conv's depthwise weight as is), B float [C] (optional). Attributes: kernel_shape [kh, kw]
// (optional, must match W), strides [2] (1,1), pads [4] (top, left, bottom, right; 0), dilations
// [2] (1,1), activation ("none"|"relu"|"relu6"|"silu"), x_channel_block and y_channel_block (1:
// NCHW; 16: NCHW16c; the same for both).
#include <algorithm>

#include "ort_common.h"
#include "ort_ops.h"

namespace es_ort {
namespace {

struct DwKernel {
  std::string where;
  int64_t kh = 0, kw = 0, sh = 1, sw = 1, dh = 1, dw = 1;
  int64_t pt = 0, pl = 0, pb = 0, pr = 0;
  int activation = ES_ACT_NONE;
  int32_t y_block = 1;
  const es_kernel_table* table = es_kernels();

  explicit DwKernel(const OrtKernelInfo* info) {
    where = "DepthwiseConv node '" + node_name(info) + "'";
    const auto ks = attr_ints_or(info, "kernel_shape", {});
    if (!ks.empty() && (ks.size() != 2 || ks[0] <= 0 || ks[1] <= 0))
      throw NodeError("attribute kernel_shape must be two positive ints [kh, kw]");
    if (ks.size() == 2) {
      kh = ks[0];
      kw = ks[1];
    }
    const auto st = attr_ints_or(info, "strides", {1, 1});
    const auto di = attr_ints_or(info, "dilations", {1, 1});
    const auto pa = attr_ints_or(info, "pads", {0, 0, 0, 0});
    if (st.size() != 2 || st[0] < 1 || st[1] < 1) throw NodeError("attribute strides must be two ints >= 1");
    if (di.size() != 2 || di[0] < 1 || di[1] < 1) throw NodeError("attribute dilations must be two ints >= 1");
    if (pa.size() != 4 || *std::min_element(pa.begin(), pa.end()) < 0)
      throw NodeError("attribute pads must be four ints >= 0 (top, left, bottom, right)");
    sh = st[0], sw = st[1], dh = di[0], dw = di[1];
    pt = pa[0], pl = pa[1], pb = pa[2], pr = pa[3];
    activation = activation_code(attr_string_or(info, "activation", "none"), true, false);
    y_block = channel_block_attr(info, "y_channel_block");
    if (channel_block_attr(info, "x_channel_block") != y_block)
      throw NodeError("x_channel_block and y_channel_block must be equal (X and Y in the same layout)");
    ONNXTensorElementDataType t;
    std::vector<int64_t> s;
    if (input_type(info, 0, &t, &s) && t != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      throw NodeError(std::string("X (input 0) must be float, got ") + dtype_name(t));
    if (input_type(info, 1, &t, &s)) {
      if (t != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        throw NodeError(std::string("W (input 1) must be float, got ") + dtype_name(t));
      if (!s.empty()) check_weight_shape(s, -1);
    }
    if (input_type(info, 2, &t, &s) && t != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      throw NodeError(std::string("B (input 2) must be float, got ") + dtype_name(t));
  }

  // W must be [C, 1, kh, kw] with kh, kw matching kernel_shape when given; c < 0: C unknown.
  void check_weight_shape(const std::vector<int64_t>& s, int64_t c) const {
    if (s.size() != 4 || s[1] != 1 || (c >= 0 && s[0] >= 0 && s[0] != c))
      throw NodeError("W must be [C, 1, kh, kw] with C = X's channels, got " + shape_str(s));
    if (kh && s[2] >= 0 && s[3] >= 0 && (s[2] != kh || s[3] != kw))
      throw NodeError("W " + shape_str(s) + " does not match kernel_shape");
    if (s[2] >= 0 && s[3] >= 0 && s[2] * s[3] > 256) throw NodeError("kernels larger than 256 taps are not supported");
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* c) {
    return guarded(where, [&] {
      Ort::KernelContext ctx(c);
      compute(ctx);
    });
  }

  void compute(Ort::KernelContext& ctx) {
    TensorView x, wt, b;
    if (!context_input(ctx, 0, &x) || !context_input(ctx, 1, &wt)) throw NodeError("missing input X or W");
    if (x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw NodeError("X must be float");
    if (wt.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw NodeError("W must be float");
    const ImageDims xd = image_dims(x.shape, "X");
    if (xd.block != y_block)
      throw NodeError("X " + shape_str(x.shape) + " is not in the layout of x_channel_block " + std::to_string(y_block));
    const int64_t n = xd.n, c = xd.c, h = xd.h, w = xd.w;
    check_weight_shape(wt.shape, c);
    const int64_t fh = wt.shape[2], fw = wt.shape[3];
    const float* bias = nullptr;
    if (context_input(ctx, 2, &b) && b.numel() > 0) {
      if (b.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || b.numel() != c)
        throw NodeError("B must be float with C=" + std::to_string(c) + " elements");
      bias = b.as<float>();
    }
    if (h + pt + pb < dh * (fh - 1) + 1 || w + pl + pr < dw * (fw - 1) + 1)
      throw NodeError("input " + shape_str(x.shape) + " is smaller than the dilated kernel");
    const int64_t oh = (h + pt + pb - dh * (fh - 1) - 1) / sh + 1;
    const int64_t ow = (w + pl + pr - dw * (fw - 1) - 1) / sw + 1;
    ImageDims yd = xd;
    yd.h = oh, yd.w = ow;
    auto y = ctx.GetOutput(0, yd.shape());
    if (n == 0 || c == 0 || oh * ow == 0) return;

    es_dwconv_args a{};
    a.x = x.as<float>();
    a.batch = n, a.channels = c, a.h = h, a.w = w;
    a.kh = fh, a.kw = fw, a.stride_h = sh, a.stride_w = sw, a.dil_h = dh, a.dil_w = dw;
    a.pad_top = pt, a.pad_left = pl, a.oh = oh, a.ow = ow;
    a.activation = activation;
    a.weights = wt.as<float>();
    a.bias = bias;
    a.y = y.GetTensorMutableData<float>();
    a.channel_block = y_block;

    const es_kernel_table* t = table;
    if (y_block == 16) {  // NCHW16c: threads split the 16-channel blocks
      const int64_t cbs = c / 16, parts = std::min<int64_t>(cbs, chunk_count((double)c * oh * ow * fh * fw));
      auto body16 = [&](size_t i) {
        const int64_t img = (int64_t)i / parts, part = (int64_t)i % parts;
        t->dwconv16_range(&a, img, cbs * part / parts, cbs * (part + 1) / parts);
      };
      parallel_for(ctx, (size_t)(n * parts), body16);
      return;
    }
    const size_t scratch = (size_t)t->dwconv_scratch(&a);
    // channels per chunk: chunk_count's rule on the multiply-adds of the whole image
    const int64_t parts = std::min<int64_t>(c, chunk_count((double)c * oh * ow * fh * fw));
    auto body = [&](size_t i) {
      const int64_t img = (int64_t)i / parts, part = (int64_t)i % parts;
      t->dwconv_range(&a, scratch_floats(scratch, 1), img, c * part / parts, c * (part + 1) / parts);
    };
    parallel_for(ctx, (size_t)(n * parts), body);
  }
};

struct DwOp : Ort::CustomOpBase<DwOp, DwKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    DwKernel* k = nullptr;
    OrtStatusPtr st = guarded("DepthwiseConv node '" + node_name(info) + "'", [&] { k = new DwKernel(info); });
    *kernel = k;
    return st;
  }
  const char* GetName() const { return "DepthwiseConv"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* depthwise_conv_op() {
  static DwOp op;
  return &op;
}

}  // namespace es_ort
