// The operators this library registers (one function per op, defined in ort_*.cpp).
#ifndef EDGESPARSE_ORT_OPS_H
#define EDGESPARSE_ORT_OPS_H

#include "ort_common.h"

namespace es_ort {
const OrtCustomOp* block_sparse_matmul_op();
const OrtCustomOp* block_sparse_conv_op();
const OrtCustomOp* block_sparse_conv_add_op();
const OrtCustomOp* depthwise_conv_op();
const OrtCustomOp* gathered_ffn_op();
const OrtCustomOp* routed_ffn_op();
}  // namespace es_ort

#endif
