/* Embedding an edgesparse package in an app, the way a phone app does it: ONNX Runtime's C API,
 * plus the package's kernel library registered on the session options. (On Android the Java/Kotlin
 * API does the same through SessionOptions.registerCustomOpLibrary; see docs/snapdragon.md.)
 *
 *   embed MODEL.onnx [KERNEL_LIBRARY.so]
 *
 * Without the library the model still runs: every sparse node carries its dense meaning as an ONNX
 * function, which ONNX Runtime inlines when no kernel is registered for it.
 * The inputs are a fixed pattern (dimensions that are not fixed become 1); each output is printed
 * as its name, shape, sum and first values.
 */
#include <stdio.h>
#include <stdlib.h>

#include "onnxruntime_c_api.h"

static const OrtApi* ort;

static void check(OrtStatus* status) {
  if (status) {
    fprintf(stderr, "embed: %s\n", ort->GetErrorMessage(status));
    ort->ReleaseStatus(status);
    exit(1);
  }
}

/* A fixed input: floats in [-1, 1], integers 0..6 (token ids, say). */
static void* pattern(ONNXTensorElementDataType type, size_t count, size_t* bytes) {
  if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    float* p = malloc(count * sizeof *p + 1);
    for (size_t i = 0; i < count; ++i) p[i] = (float)((i * 37) % 101) / 50.0f - 1.0f;
    *bytes = count * sizeof *p;
    return p;
  }
  if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) {
    int64_t* p = malloc(count * sizeof *p + 1);
    for (size_t i = 0; i < count; ++i) p[i] = (int64_t)(i % 7);
    *bytes = count * sizeof *p;
    return p;
  }
  fprintf(stderr, "embed: this sample feeds float and int64 inputs only\n");
  exit(1);
}

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: embed MODEL.onnx [KERNEL_LIBRARY.so]\n");
    return 2;
  }
  ort = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  if (!ort) {
    fprintf(stderr, "embed: ONNX Runtime %s is too old for this build\n", OrtGetApiBase()->GetVersionString());
    return 1;
  }
  OrtEnv* env;
  OrtSessionOptions* options;
  OrtSession* session;
  check(ort->CreateEnv(ORT_LOGGING_LEVEL_WARNING, "embed", &env));
  check(ort->CreateSessionOptions(&options));
  check(ort->SetIntraOpNumThreads(options, 1));
  if (argc > 2) check(ort->RegisterCustomOpsLibrary_V2(options, argv[2])); /* the sparse kernels */
  check(ort->CreateSession(env, argv[1], options, &session));

  OrtAllocator* alloc;
  OrtMemoryInfo* cpu;
  check(ort->GetAllocatorWithDefaultOptions(&alloc));
  check(ort->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &cpu));
  size_t n_in, n_out;
  check(ort->SessionGetInputCount(session, &n_in));
  check(ort->SessionGetOutputCount(session, &n_out));
  char** in_names = calloc(n_in + 1, sizeof(char*));
  char** out_names = calloc(n_out + 1, sizeof(char*));
  OrtValue** inputs = calloc(n_in + 1, sizeof(OrtValue*));
  OrtValue** outputs = calloc(n_out + 1, sizeof(OrtValue*));
  void** buffers = calloc(n_in + 1, sizeof(void*));

  for (size_t i = 0; i < n_in; ++i) {
    OrtTypeInfo* type_info;
    const OrtTensorTypeAndShapeInfo* info;
    ONNXTensorElementDataType type;
    size_t rank, count = 1, bytes;
    int64_t dims[16];
    check(ort->SessionGetInputName(session, i, alloc, &in_names[i]));
    check(ort->SessionGetInputTypeInfo(session, i, &type_info));
    check(ort->CastTypeInfoToTensorInfo(type_info, &info));
    check(ort->GetTensorElementType(info, &type));
    check(ort->GetDimensionsCount(info, &rank));
    if (rank > 16) rank = 16;
    check(ort->GetDimensions(info, dims, rank));
    for (size_t d = 0; d < rank; ++d) {
      if (dims[d] < 1) dims[d] = 1; /* a symbolic dimension (batch, sequence): use 1 */
      count *= (size_t)dims[d];
    }
    buffers[i] = pattern(type, count, &bytes);
    check(ort->CreateTensorWithDataAsOrtValue(cpu, buffers[i], bytes, dims, rank, type, &inputs[i]));
    ort->ReleaseTypeInfo(type_info);
  }
  for (size_t i = 0; i < n_out; ++i) check(ort->SessionGetOutputName(session, i, alloc, &out_names[i]));

  check(ort->Run(session, NULL, (const char* const*)in_names, (const OrtValue* const*)inputs, n_in,
                 (const char* const*)out_names, n_out, outputs));

  for (size_t i = 0; i < n_out; ++i) {
    OrtTensorTypeAndShapeInfo* info;
    ONNXTensorElementDataType type;
    size_t rank, count;
    int64_t dims[16];
    float* data;
    check(ort->GetTensorTypeAndShape(outputs[i], &info));
    check(ort->GetTensorElementType(info, &type));
    check(ort->GetDimensionsCount(info, &rank));
    if (rank > 16) rank = 16;
    check(ort->GetDimensions(info, dims, rank));
    check(ort->GetTensorShapeElementCount(info, &count));
    ort->ReleaseTensorTypeAndShapeInfo(info);
    printf("output %s shape [", out_names[i]);
    for (size_t d = 0; d < rank; ++d) printf(d ? ",%lld" : "%lld", (long long)dims[d]);
    printf("]");
    if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      printf(" (not float)\n");
      continue;
    }
    check(ort->GetTensorMutableData(outputs[i], (void**)&data));
    double sum = 0;
    for (size_t j = 0; j < count; ++j) sum += data[j];
    printf(" sum %.9g first", sum);
    for (size_t j = 0; j < count && j < 8; ++j) printf(" %.9g", data[j]);
    printf("\n");
  }

  for (size_t i = 0; i < n_out; ++i) {
    ort->ReleaseValue(outputs[i]);
    check(ort->AllocatorFree(alloc, out_names[i]));
  }
  for (size_t i = 0; i < n_in; ++i) {
    ort->ReleaseValue(inputs[i]);
    check(ort->AllocatorFree(alloc, in_names[i]));
    free(buffers[i]);
  }
  free(in_names); free(out_names); free(inputs); free(outputs); free(buffers);
  ort->ReleaseMemoryInfo(cpu);
  ort->ReleaseSession(session);
  ort->ReleaseSessionOptions(options);
  ort->ReleaseEnv(env);
  return 0;
}
