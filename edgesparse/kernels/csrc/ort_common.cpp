// Helpers shared by the ORT operator glue.
#include "ort_common.h"

#include <algorithm>
#include <memory>

namespace es_ort {

int activation_code(const std::string& name, bool allow_relu6, bool allow_gelu) {
  if (name == "none" || name.empty()) return ES_ACT_NONE;
  if (name == "relu") return ES_ACT_RELU;
  if (name == "silu") return ES_ACT_SILU;
  if (name == "relu6" && allow_relu6) return ES_ACT_RELU6;
  if (name == "gelu" && allow_gelu) return ES_ACT_GELU;
  throw NodeError("unsupported activation '" + name + "'");
}

const char* dtype_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "double";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return "int16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    default: return "other";
  }
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

TensorView view(const Ort::ConstValue& v) {
  TensorView t;
  auto info = v.GetTensorTypeAndShapeInfo();
  t.type = info.GetElementType();
  t.shape = info.GetShape();
  t.data = v.GetTensorRawData();
  return t;
}

void expect(const TensorView& t, const char* what, ONNXTensorElementDataType type,
            std::vector<int64_t> dims) {
  if (t.type != type)
    throw NodeError(std::string(what) + " must be " + dtype_name(type) + ", got " + dtype_name(t.type));
  if (t.shape.size() != dims.size())
    throw NodeError(std::string(what) + " must have rank " + std::to_string(dims.size()) + ", got shape " +
                    shape_str(t.shape));
  for (size_t i = 0; i < dims.size(); ++i)
    if (dims[i] >= 0 && t.shape[i] != dims[i])
      throw NodeError(std::string(what) + " has shape " + shape_str(t.shape) + ", expected " + shape_str(dims) +
                      " (-1 = any)");
}

bool constant_input(const OrtKernelInfo* info, size_t index, TensorView* out) {
  const OrtApi& api = Ort::GetApi();
  size_t count = 0;
  Ort::ThrowOnError(api.KernelInfo_GetInputCount(info, &count));
  if (index >= count) return false;
  int is_const = 0;
  const OrtValue* value = nullptr;
  if (OrtStatus* st = api.KernelInfoGetConstantInput_tensor(info, index, &is_const, &value)) {
    api.ReleaseStatus(st);
    return false;
  }
  if (!is_const || value == nullptr) return false;
  *out = view(Ort::ConstValue{value});
  return true;
}

bool input_type(const OrtKernelInfo* info, size_t index, ONNXTensorElementDataType* type,
                std::vector<int64_t>* shape) {
  const OrtApi& api = Ort::GetApi();
  size_t count = 0;
  Ort::ThrowOnError(api.KernelInfo_GetInputCount(info, &count));
  if (index >= count) return false;
  OrtTypeInfo* ti = nullptr;
  if (OrtStatus* st = api.KernelInfo_GetInputTypeInfo(info, index, &ti)) {
    api.ReleaseStatus(st);
    return false;
  }
  Ort::TypeInfo owned{ti};
  if (owned.GetONNXType() != ONNX_TYPE_TENSOR) return false;
  auto tsi = owned.GetTensorTypeAndShapeInfo();
  *type = tsi.GetElementType();
  *shape = tsi.GetShape();
  return true;
}

bool context_input(Ort::KernelContext& ctx, size_t index, TensorView* out) {
  if (index >= ctx.GetInputCount()) return false;
  Ort::ConstValue v = ctx.GetInput(index);
  if (!v) return false;
  *out = view(v);
  return true;
}

float* scratch_floats(size_t count, int slot) {
  struct Buf {
    std::unique_ptr<float[]> p;
    float* aligned = nullptr;
    size_t n = 0;
  };
  thread_local Buf bufs[4];
  Buf& b = bufs[slot];
  if (b.n < count) {
    // +16: vector tails may read past the end; the pad: start on a cache line (es_scratch_align)
    constexpr size_t pad = ES_SCRATCH_PAD / sizeof(float);
    size_t n = std::max(count, b.n * 2) + 16 + pad;
    b.p.reset(new float[n]);
    b.aligned = es_scratch_align(b.p.get());
    b.n = n - 16 - pad;
  }
  return b.aligned;
}

std::vector<int64_t> split_rows(const int32_t* row_ptr, int64_t nb, int64_t parts) {
  parts = std::max<int64_t>(1, std::min(parts, nb));
  std::vector<int64_t> bounds{0};
  const double total = (double)row_ptr[nb] + (double)nb;
  int64_t j = 0;
  for (int64_t c = 1; c < parts; ++c) {
    const double target = total * (double)c / (double)parts;
    while (j < nb && (double)row_ptr[j] + (double)j < target) ++j;
    if (j > bounds.back() && j < nb) bounds.push_back(j);
  }
  bounds.push_back(nb);
  return bounds;
}

int64_t chunk_count(double work) {
  // Below ~128K multiply-adds (a few microseconds) waking a second thread
  // costs more than it saves. Above, ~32K per chunk keeps scheduling cheap
  // while leaving enough chunks to balance uneven block rows; at most 128.
  if (work < 131072.0) return 1;
  const int64_t c = (int64_t)(work / 32768.0);
  return std::max<int64_t>(2, std::min<int64_t>(c, 128));
}

ImageDims image_dims(const std::vector<int64_t>& s, const char* what) {
  ImageDims d;
  if (s.size() == 4) {
    d.n = s[0], d.c = s[1], d.h = s[2], d.w = s[3];
    return d;
  }
  if (s.size() == 5 && s[4] == 16) {
    d.n = s[0], d.c = s[1] * 16, d.h = s[2], d.w = s[3], d.block = 16;
    return d;
  }
  throw NodeError(std::string(what) + " must be 4-D NCHW or 5-D NCHW16c [N, C/16, H, W, 16], got " + shape_str(s));
}

int32_t channel_block_attr(const OrtKernelInfo* info, const char* name) {
  const int64_t b = attr_int_or(info, name, 1);
  if (b != 1 && b != 16)
    throw NodeError(std::string("attribute ") + name + " must be 1 (NCHW) or 16 (NCHW16c), got " + std::to_string(b));
  return (int32_t)b;
}

}  // namespace es_ort
