/* es_run: runs an edgesparse package's model once through ONNX Runtime's C API, with the kernel
 * library registered, on inputs read from a tensor file; writes the outputs to another.
 * The snapdragon target cross-compiles it for aarch64 and runs it under qemu to verify packages.
 *
 *   es_run MODEL.onnx INPUTS.esbt OUTPUTS.esbt [--lib LIB.so]... [--threads N] [--profile PREFIX]
 *
 * With --profile, ORT's profiler is on and the path of its JSON trace is printed on stdout as
 * "profile: PATH" (the target counts from it the nodes that ran on custom kernels).
 *
 * Tensor file (little-endian), documented in docs/snapdragon.md:
 *   "ESBT" | u32 version = 1 | u32 count | count x tensor
 *   tensor: u32 name_len | name (UTF-8, no NUL) | i32 element type (ONNX TensorProto numbering)
 *           | u32 rank | i64 dims[rank] | data, row major, prod(dims) x element size bytes
 * Plain C99; needs only the ORT C API header (onnxruntime_c_api.h, API version >= 21).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "onnxruntime_c_api.h"

static const OrtApi* ort;

static void die(const char* what, const char* detail) {
  fprintf(stderr, "es_run: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
  exit(1);
}

static void check(OrtStatus* status, const char* what) {
  if (status) {
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", ort->GetErrorMessage(status));
    ort->ReleaseStatus(status);
    for (char* p = msg; *p; ++p)
      if (*p == '\n') *p = ' ';
    die(what, msg);
  }
}

static size_t element_size(int32_t type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32: return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64: return 8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return 2;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return 1;
    default: return 0;
  }
}

typedef struct {
  char* name;
  int32_t type;
  uint32_t rank;
  int64_t dims[16];
  size_t bytes;
  void* data;
} Tensor;

static void read_exact(FILE* f, void* p, size_t n, const char* path) {
  if (n && fread(p, 1, n, f) != n) die("truncated tensor file", path);
}

static Tensor* read_tensors(const char* path, uint32_t* count) {
  FILE* f = fopen(path, "rb");
  if (!f) die("cannot open", path);
  char magic[4];
  uint32_t version;
  read_exact(f, magic, 4, path);
  read_exact(f, &version, 4, path);
  if (memcmp(magic, "ESBT", 4) != 0 || version != 1) die("not an ESBT version 1 tensor file", path);
  read_exact(f, count, 4, path);
  Tensor* t = calloc(*count ? *count : 1, sizeof(Tensor));
  for (uint32_t i = 0; i < *count; ++i) {
    uint32_t len;
    read_exact(f, &len, 4, path);
    if (len > 4096) die("tensor name too long in", path);
    t[i].name = calloc(len + 1, 1);
    read_exact(f, t[i].name, len, path);
    read_exact(f, &t[i].type, 4, path);
    read_exact(f, &t[i].rank, 4, path);
    if (t[i].rank > 16) die("tensor rank above 16 in", path);
    read_exact(f, t[i].dims, 8 * (size_t)t[i].rank, path);
    size_t n = element_size(t[i].type);
    if (!n) die("unsupported element type for input", t[i].name);
    for (uint32_t d = 0; d < t[i].rank; ++d) {
      if (t[i].dims[d] < 0) die("negative dimension in input", t[i].name);
      n *= (size_t)t[i].dims[d];
    }
    t[i].bytes = n;
    t[i].data = malloc(n ? n : 1);
    read_exact(f, t[i].data, n, path);
  }
  fclose(f);
  return t;
}

static void write_tensor(FILE* f, const char* name, OrtValue* value) {
  OrtTensorTypeAndShapeInfo* info;
  check(ort->GetTensorTypeAndShape(value, &info), "output info");
  ONNXTensorElementDataType type;
  size_t rank, count;
  check(ort->GetTensorElementType(info, &type), "output type");
  check(ort->GetDimensionsCount(info, &rank), "output rank");
  check(ort->GetTensorShapeElementCount(info, &count), "output size");
  int64_t dims[16];
  if (rank > 16) die("output rank above 16", name);
  check(ort->GetDimensions(info, dims, rank), "output shape");
  ort->ReleaseTensorTypeAndShapeInfo(info);
  size_t size = element_size(type);
  if (!size) die("unsupported output element type", name);
  void* data = NULL;
  if (count) check(ort->GetTensorMutableData(value, &data), "output data");
  uint32_t len = (uint32_t)strlen(name), r = (uint32_t)rank;
  int32_t t = (int32_t)type;
  fwrite(&len, 4, 1, f);
  fwrite(name, 1, len, f);
  fwrite(&t, 4, 1, f);
  fwrite(&r, 4, 1, f);
  fwrite(dims, 8, rank, f);
  if (count && fwrite(data, size, count, f) != count) die("cannot write output", name);
}

int main(int argc, char** argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: es_run MODEL INPUTS OUTPUTS [--lib LIB]... [--threads N] [--profile PREFIX]\n");
    return 2;
  }
  const char *model = argv[1], *in_path = argv[2], *out_path = argv[3], *profile = NULL;
  int threads = 1;
  const OrtApiBase* base = OrtGetApiBase();
  ort = base->GetApi(ORT_API_VERSION);
  if (!ort) die("this ONNX Runtime is older than the C API version es_run was built for", base->GetVersionString());

  OrtEnv* env;
  check(ort->CreateEnv(ORT_LOGGING_LEVEL_ERROR, "es_run", &env), "CreateEnv");
  OrtSessionOptions* options;
  check(ort->CreateSessionOptions(&options), "CreateSessionOptions");
  for (int i = 4; i < argc; ++i) {
    if (strcmp(argv[i], "--lib") == 0 && i + 1 < argc) {
      /* what SessionOptions.registerCustomOpLibrary does on Android */
      check(ort->RegisterCustomOpsLibrary_V2(options, argv[++i]), "registering the kernel library");
    } else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
      threads = atoi(argv[++i]);
    } else if (strcmp(argv[i], "--profile") == 0 && i + 1 < argc) {
      profile = argv[++i];
    } else {
      die("unknown argument", argv[i]);
    }
  }
  check(ort->SetIntraOpNumThreads(options, threads), "SetIntraOpNumThreads");
  check(ort->SetInterOpNumThreads(options, 1), "SetInterOpNumThreads");
  if (profile) check(ort->EnableProfiling(options, profile), "EnableProfiling");
  OrtSession* session;
  check(ort->CreateSession(env, model, options, &session), "loading the model");

  uint32_t n_in;
  Tensor* inputs = read_tensors(in_path, &n_in);
  OrtMemoryInfo* cpu;
  check(ort->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &cpu), "CreateCpuMemoryInfo");
  const char** in_names = calloc(n_in ? n_in : 1, sizeof(char*));
  OrtValue** in_values = calloc(n_in ? n_in : 1, sizeof(OrtValue*));
  for (uint32_t i = 0; i < n_in; ++i) {
    in_names[i] = inputs[i].name;
    check(ort->CreateTensorWithDataAsOrtValue(cpu, inputs[i].data, inputs[i].bytes, inputs[i].dims, inputs[i].rank,
                                              (ONNXTensorElementDataType)inputs[i].type, &in_values[i]),
          "creating an input tensor");
  }

  OrtAllocator* alloc;
  check(ort->GetAllocatorWithDefaultOptions(&alloc), "GetAllocatorWithDefaultOptions");
  size_t n_out;
  check(ort->SessionGetOutputCount(session, &n_out), "SessionGetOutputCount");
  char** out_names = calloc(n_out ? n_out : 1, sizeof(char*));
  OrtValue** out_values = calloc(n_out ? n_out : 1, sizeof(OrtValue*));
  for (size_t i = 0; i < n_out; ++i) check(ort->SessionGetOutputName(session, i, alloc, &out_names[i]), "output name");
  check(ort->Run(session, NULL, in_names, (const OrtValue* const*)in_values, n_in, (const char* const*)out_names, n_out,
                 out_values),
        "running the model");

  FILE* f = fopen(out_path, "wb");
  if (!f) die("cannot create", out_path);
  uint32_t version = 1, count = (uint32_t)n_out;
  fwrite("ESBT", 1, 4, f);
  fwrite(&version, 4, 1, f);
  fwrite(&count, 4, 1, f);
  for (size_t i = 0; i < n_out; ++i) write_tensor(f, out_names[i], out_values[i]);
  if (fclose(f) != 0) die("cannot write", out_path);

  if (profile) {
    char* trace;
    check(ort->SessionEndProfiling(session, alloc, &trace), "SessionEndProfiling");
    printf("profile: %s\n", trace);
    check(ort->AllocatorFree(alloc, trace), "AllocatorFree");
  }
  for (size_t i = 0; i < n_out; ++i) {
    ort->ReleaseValue(out_values[i]);
    check(ort->AllocatorFree(alloc, out_names[i]), "AllocatorFree");
  }
  for (uint32_t i = 0; i < n_in; ++i) {
    ort->ReleaseValue(in_values[i]);
    free(inputs[i].data);
    free(inputs[i].name);
  }
  free(inputs); free(in_names); free(in_values); free(out_names); free(out_values);
  ort->ReleaseMemoryInfo(cpu);
  ort->ReleaseSession(session);
  ort->ReleaseSessionOptions(options);
  ort->ReleaseEnv(env);
  return 0;
}
