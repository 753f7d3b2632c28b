// Library entry point for SessionOptions.register_custom_ops_library.
#include "ort_ops.h"

extern "C" ES_API OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                             const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // The runtime is older than the headers we were built with (API 21, ORT 1.21).
    const OrtApi* v1 = api_base->GetApi(1);
    return v1->CreateStatus(ORT_FAIL,
                            "edgesparse kernels need ONNX Runtime >= 1.21 (C API version 21); this "
                            "runtime does not provide it");
  }
  Ort::InitApi(api);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(es_ort::kDomain, &domain)) return st;
  const OrtCustomOp* ops[] = {
      es_ort::block_sparse_matmul_op(),
      es_ort::block_sparse_conv_op(),
      es_ort::block_sparse_conv_add_op(),
      es_ort::depthwise_conv_op(),
      es_ort::gathered_ffn_op(),
      es_ort::routed_ffn_op(),
  };
  for (const OrtCustomOp* op : ops) {
    if (OrtStatus* st = api->CustomOpDomain_Add(domain, op)) {
      api->ReleaseCustomOpDomain(domain);
      return st;
    }
  }
  // The domain must outlive the sessions using it; ORT does not take
  // ownership, so it is intentionally leaked (one small object per options).
  return api->AddCustomOpDomain(options, domain);
}
