// Shared helpers for the ONNX Runtime glue (not part of the pure kernels).
//
// The library links nothing but the C/C++ runtime: ORT_API_MANUAL_INIT and
// Ort::InitApi in RegisterCustomOps. Errors travel as OrtStatus (the V2
// create/compute callbacks), never as exceptions across the C boundary.
#ifndef EDGESPARSE_ORT_COMMON_H
#define EDGESPARSE_ORT_COMMON_H

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "es_kernels.h"

namespace es_ort {

constexpr const char* kDomain = "com.edgesparse";

// An error that names the node; converted to an OrtStatus at the boundary.
struct NodeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline OrtStatusPtr make_status(const std::string& msg, OrtErrorCode code = ORT_INVALID_ARGUMENT) {
  return Ort::GetApi().CreateStatus(code, msg.c_str());
}

// Runs f, turning every C++ exception into an OrtStatus with the node named.
template <class F>
OrtStatusPtr guarded(const std::string& where, F&& f) {
  try {
    f();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return make_status(where + ": " + e.what(), e.GetOrtErrorCode());
  } catch (const std::exception& e) {
    return make_status(where + ": " + e.what());
  } catch (...) {
    return make_status(where + ": unknown error", ORT_FAIL);
  }
}

inline std::string node_name(const OrtKernelInfo* info) {
  size_t size = 0;
  const OrtApi& api = Ort::GetApi();
  if (OrtStatus* st = api.KernelInfo_GetNodeName(info, nullptr, &size)) {
    api.ReleaseStatus(st);
    return "?";
  }
  std::string out(size, '\0');
  if (OrtStatus* st = api.KernelInfo_GetNodeName(info, &out[0], &size)) {
    api.ReleaseStatus(st);
    return "?";
  }
  if (!out.empty() && out.back() == '\0') out.pop_back();
  return out;
}

// Attribute readers that return a default instead of throwing when absent.
inline bool attr_int(const OrtKernelInfo* info, const char* name, int64_t* out) {
  const OrtApi& api = Ort::GetApi();
  if (OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, out)) {
    api.ReleaseStatus(st);
    return false;
  }
  return true;
}

inline int64_t attr_int_or(const OrtKernelInfo* info, const char* name, int64_t dflt) {
  int64_t v = 0;
  return attr_int(info, name, &v) ? v : dflt;
}

inline std::vector<int64_t> attr_ints_or(const OrtKernelInfo* info, const char* name,
                                         std::vector<int64_t> dflt) {
  const OrtApi& api = Ort::GetApi();
  size_t size = 0;
  if (OrtStatus* st = api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &size)) {
    api.ReleaseStatus(st);
    return dflt;
  }
  std::vector<int64_t> out(size);
  if (size == 0) return out;
  if (OrtStatus* st = api.KernelInfoGetAttributeArray_int64(info, name, out.data(), &size)) {
    api.ReleaseStatus(st);
    return dflt;
  }
  return out;
}

inline std::string attr_string_or(const OrtKernelInfo* info, const char* name, const std::string& dflt) {
  const OrtApi& api = Ort::GetApi();
  size_t size = 0;
  if (OrtStatus* st = api.KernelInfoGetAttribute_string(info, name, nullptr, &size)) {
    api.ReleaseStatus(st);
    return dflt;
  }
  std::string out(size, '\0');
  if (OrtStatus* st = api.KernelInfoGetAttribute_string(info, name, &out[0], &size)) {
    api.ReleaseStatus(st);
    return dflt;
  }
  if (!out.empty() && out.back() == '\0') out.pop_back();
  return out;
}

// Maps an activation attribute to ES_ACT_*; throws for unknown names.
int activation_code(const std::string& name, bool allow_relu6, bool allow_gelu);

const char* dtype_name(ONNXTensorElementDataType t);

// A tensor seen through its element type and shape.
struct TensorView {
  const void* data = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  template <class T>
  const T* as() const { return static_cast<const T*>(data); }
};

TensorView view(const Ort::ConstValue& v);
std::string shape_str(const std::vector<int64_t>& s);

// Checks a tensor's element type and rank (and optionally exact dims, -1 = any).
void expect(const TensorView& t, const char* what, ONNXTensorElementDataType type,
            std::vector<int64_t> dims);

// Constant initializer input (is_constant and its view), read at session creation.
bool constant_input(const OrtKernelInfo* info, size_t index, TensorView* out);

// Input element type and static shape from the graph (dims < 0 are symbolic).
bool input_type(const OrtKernelInfo* info, size_t index, ONNXTensorElementDataType* type,
                std::vector<int64_t>* shape);

// Present optional input (nullptr-safe), from a compute context.
bool context_input(Ort::KernelContext& ctx, size_t index, TensorView* out);

// Per-thread scratch memory reused across calls (grows, never shrinks).
float* scratch_floats(size_t count, int slot = 0);

// Runs fn(i) for i in [0, total) on ORT's intra-op pool (inline if total <= 1).
template <class F>
void parallel_for(Ort::KernelContext& ctx, size_t total, F& fn) {
  if (total == 0) return;
  if (total == 1) {
    fn(0);
    return;
  }
  ctx.ParallelFor([](void* d, size_t i) { (*static_cast<F*>(d))(i); }, total, 0, &fn);
}

// Splits block rows [0, nb) into `parts` ranges of similar work
// (blocks + one per row for the epilogue), using the row pointer.
std::vector<int64_t> split_rows(const int32_t* row_ptr, int64_t nb, int64_t parts);

// How many parallel chunks a job of `work` multiply-adds deserves.
int64_t chunk_count(double work);

// An image tensor in NCHW ([N, C, H, W], block 1) or NCHW16c ([N, C/16, H, W, 16], block 16): the
// layout is told by the rank. Throws naming `what` for any other shape.
struct ImageDims {
  int64_t n = 0, c = 0, h = 0, w = 0;
  int32_t block = 1;
  std::vector<int64_t> shape() const {
    if (block == 1) return {n, c, h, w};
    return {n, c / block, h, w, block};
  }
};
ImageDims image_dims(const std::vector<int64_t>& s, const char* what);

// A layout attribute (x_channel_block, y_channel_block): 1 (NCHW, the default) or 16 (NCHW16c).
int32_t channel_block_attr(const OrtKernelInfo* info, const char* name);

}  // namespace es_ort

#endif
