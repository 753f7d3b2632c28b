// ONNX Runtime glue for com.edgesparse.deltallm::DeltaAttention.
//
// Inputs:  0 Q float [B, H, T, D] (after RoPE, unscaled)
//          1 K float [B, Hkv, N, D] (cache + new keys), 2 V float [B, Hkv, N, D]
//          3 theta_q float [1], [H] or [H, D] (per head and dimension), 4 theta_v float [1] or [H]
//            (thresholds, usually initializers)
//          5 state float [B, H, M] (optional; M = 0: fresh sequence, else 2 * D + 4 + 2 * (N - T),
//            the state output of the previous call)
// Outputs: 0 Y float [B, H, T, D]
//          1 state float [B, H, 2 * D + 4 + 2 * N] (optional)
//          2 macs int64 [B, H, 3] (optional: dense causal MACs, QK MACs spent, PV MACs spent)
// Attributes: scale (float), window (int >= 1), sinks (int >= 0), carry (int, default 0),
//             softcap (float, default 0: none; logits = softcap * tanh(scale q.k / softcap)),
//             span (int, default 0: none; a sliding window: row p sees keys p - span < j <= p;
//             inside it keys j > p - window are exact and older ones go through the delta
//             approximation, leaving the running sums when they leave the window; sinks do not
//             apply; window >= span: exact).
// carry = 1 keeps the state inside the node between calls when no state input is given: a call
// whose cache is the previous call's keys plus new ones (same length, same first and last key
// rows) continues the sequence (decode); any other call starts afresh. The graph's inputs and
// outputs then stay those of the original model.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <cmath>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "delta_attention.h"

#if defined(_WIN32)
#define DL_API __declspec(dllexport)
#else
#define DL_API __attribute__((visibility("default")))
#endif

namespace {

constexpr const char* kDomain = "com.edgesparse.deltallm";

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

std::string node_name(const OrtKernelInfo* info) {
  const OrtApi& api = Ort::GetApi();
  size_t size = 0;
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

template <class T>
T attr(const OrtKernelInfo* info, const char* name) {
  const OrtApi& api = Ort::GetApi();
  T v{};
  OrtStatus* st = nullptr;
  if constexpr (std::is_same_v<T, float>)
    st = api.KernelInfoGetAttribute_float(info, name, &v);
  else
    st = api.KernelInfoGetAttribute_int64(info, name, &v);
  if (st) {
    api.ReleaseStatus(st);
    throw Error(std::string("missing attribute ") + name);
  }
  return v;
}

struct Input {
  const float* data = nullptr;
  std::vector<int64_t> shape;
};

Input input(Ort::KernelContext& ctx, size_t i, const char* what) {
  Ort::ConstValue v = ctx.GetInput(i);
  Input in;
  if (!v) return in;
  auto info = v.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw Error(std::string(what) + " must be float");
  in.shape = info.GetShape();
  in.data = v.GetTensorData<float>();
  return in;
}

struct Kernel {
  std::string where;
  float scale = 1.f, softcap = 0.f;
  int64_t window = 1, sinks = 0, span = 0;
  bool carry = false;
  const dl_table* table = dl_kernels();
  // carry = 1: the state of the last call, and what identifies its sequence
  std::mutex mu;
  std::vector<float> kept;        // [B, H, hdr + 2 * n_kept]
  std::vector<float> kept_print;  // per (b, kv head): first and last key rows
  int64_t kept_b = -1, kept_h = -1, kept_n = -1, kept_d = -1;
  // carry = 1: the keys of the last call, transposed ([B * Hkv, D, kt_cap]); a call that
  // continues the sequence transposes only its new keys (decode would otherwise re-transpose
  // the whole cache per token, which cost more than the attention itself)
  std::vector<float> kt_kept, kmax_kept;
  int64_t kt_cap = 0, kt_n = -1, kt_groups = -1;

  explicit Kernel(const OrtKernelInfo* info) {
    where = "DeltaAttention node '" + node_name(info) + "'";
    scale = attr<float>(info, "scale");
    window = attr<int64_t>(info, "window");
    sinks = attr<int64_t>(info, "sinks");
    int64_t c = 0;
    const OrtApi& api = Ort::GetApi();
    if (OrtStatus* st = api.KernelInfoGetAttribute_int64(info, "carry", &c)) api.ReleaseStatus(st);
    carry = c != 0;
    if (OrtStatus* st = api.KernelInfoGetAttribute_float(info, "softcap", &softcap)) api.ReleaseStatus(st);
    if (OrtStatus* st = api.KernelInfoGetAttribute_int64(info, "span", &span)) api.ReleaseStatus(st);
    if (!(softcap >= 0.f)) throw Error("softcap must be >= 0");
    if (span < 0) throw Error("span must be >= 0");
    if (span > 0) sinks = 0;  // a sliding-window layer: keys before the window are not seen at all
    if (window < 1) throw Error("window must be >= 1");
    if (sinks < 0) throw Error("sinks must be >= 0");
    if (!(scale > 0.f)) throw Error("scale must be positive");
  }

  static std::vector<float> fingerprint(const float* k, int64_t groups, int64_t n, int64_t d) {
    std::vector<float> fp;
    if (n <= 0) return fp;
    fp.reserve((size_t)(groups * 2 * d));
    for (int64_t g = 0; g < groups; ++g) {
      const float* kg = k + g * n * d;
      fp.insert(fp.end(), kg, kg + d);
      fp.insert(fp.end(), kg + (n - 1) * d, kg + n * d);
    }
    return fp;
  }

  // thresholds as [heads * per] values: the input holds 1, heads or heads * per (per > 1) of them
  std::vector<float> thresholds(Ort::KernelContext& ctx, size_t i, const char* what, int64_t heads, int64_t per) {
    Input t = input(ctx, i, what);
    int64_t count = 1;
    for (int64_t s : t.shape) count *= s;
    if (!t.data || (count != 1 && count != heads && count != heads * per))
      throw Error(std::string(what) + " needs 1, H=" + std::to_string(heads) +
                  (per > 1 ? " or H*D=" + std::to_string(heads * per) : std::string()) + " values, got " +
                  shape_str(t.shape));
    for (int64_t j = 0; j < count; ++j)
      if (!(t.data[j] >= 0.f)) throw Error(std::string(what) + " must be >= 0");
    std::vector<float> v((size_t)(heads * per));
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t d = 0; d < per; ++d)
        v[(size_t)(h * per + d)] = count == 1 ? t.data[0] : count == heads ? t.data[h] : t.data[h * per + d];
    return v;
  }

  void compute(Ort::KernelContext& ctx) {
    Input q = input(ctx, 0, "Q (input 0)"), k = input(ctx, 1, "K (input 1)"), v = input(ctx, 2, "V (input 2)");
    if (q.shape.size() != 4 || k.shape.size() != 4 || v.shape != k.shape)
      throw Error("expects Q [B, H, T, D], K and V [B, Hkv, N, D]; got Q " + shape_str(q.shape) + ", K " +
                  shape_str(k.shape) + ", V " + shape_str(v.shape));
    const int64_t B = q.shape[0], H = q.shape[1], T = q.shape[2], D = q.shape[3];
    const int64_t HKV = k.shape[1], N = k.shape[2];
    if (k.shape[0] != B || k.shape[3] != D || HKV <= 0 || H % HKV)
      throw Error("Q " + shape_str(q.shape) + " and K " + shape_str(k.shape) + " do not match (B, D, H % Hkv)");
    if (N < T) throw Error("K has fewer keys (" + std::to_string(N) + ") than Q has rows (" + std::to_string(T) + ")");
    const dl_table* tb = table->supports(D) ? table : dl_generic_kernels();
    if (!tb->supports(D))
      throw Error("head dim " + std::to_string(D) + " is not supported (multiples of 4 up to 256: 32, 64, 80, 96, 128, 256, ...)");
    std::vector<float> thq = thresholds(ctx, 3, "theta_q (input 3)", H, D);
    std::vector<float> thv = thresholds(ctx, 4, "theta_v (input 4)", H, 1);
    Input state;
    if (ctx.GetInputCount() > 5) state = input(ctx, 5, "state (input 5)");
    const int64_t hdr = DL_STATE_HEADER(D);
    const float* state_in = nullptr;
    if (state.data && !state.shape.empty()) {
      if (state.shape.size() != 3 || state.shape[0] != B || state.shape[1] != H)
        throw Error("state must be [B, H, M], got " + shape_str(state.shape));
      if (state.shape[2] != 0) {
        if (state.shape[2] != hdr + 2 * (N - T))
          throw Error("state holds " + std::to_string(state.shape[2]) + " floats per head but the cache has " +
                      std::to_string(N - T) + " past keys (expected " + std::to_string(hdr + 2 * (N - T)) +
                      "); feed back the state output of the previous call");
        state_in = state.data;
      }
    }
    const bool use_kept = carry && !state.data;
    std::unique_lock<std::mutex> lock(mu, std::defer_lock);
    if (use_kept) {
      lock.lock();
      if (kept_n >= 0 && kept_b == B && kept_h == H && kept_d == D && kept_n == N - T && N - T > 0 &&
          kept_print.size() == (size_t)(B * HKV * 2 * D)) {
        // same sequence: the past keys must start and end with the rows the state was built on
        bool same = true;
        for (int64_t g = 0; g < B * HKV && same; ++g) {
          const float* kg = k.data + g * N * D;
          const float* fp = kept_print.data() + g * 2 * D;
          same = !memcmp(kg, fp, sizeof(float) * (size_t)D) && !memcmp(kg + (N - T - 1) * D, fp + D, sizeof(float) * (size_t)D);
        }
        if (same) state_in = kept.data();
      }
    }

    auto y = ctx.GetOutput(0, {B, H, T, D});
    float* yp = y.GetTensorMutableData<float>();
    float* sp = nullptr;
    int64_t* mp = nullptr;
    const size_t outs = ctx.GetOutputCount();
    if (outs > 1) {
      auto so = ctx.GetOutput(1, {B, H, hdr + 2 * N});
      if (so) sp = so.GetTensorMutableData<float>();
    }
    if (outs > 2) {
      auto mo = ctx.GetOutput(2, {B, H, 3});
      if (mo) mp = mo.GetTensorMutableData<int64_t>();
    }
    std::vector<float> next;
    if (use_kept && !sp) {
      next.resize((size_t)(B * H * (hdr + 2 * N)));
      sp = next.data();
    }
    if (B == 0 || H == 0 || T == 0) {
      if (sp)
        for (int64_t i = 0; i < B * H; ++i) {
          float* s = sp + i * (hdr + 2 * N);
          if (state_in) std::copy(state_in + i * (hdr + 2 * N), state_in + (i + 1) * (hdr + 2 * N), s);
          else std::fill(s, s + hdr + 2 * N, 0.f);
        }
      if (mp) std::fill(mp, mp + B * H * 3, 0);
      return;
    }

    const int64_t vw = tb->vector_floats;
    int64_t np = (N + vw - 1) / vw * vw + vw;  // one spare vector for aligned tails
    std::vector<float> kt_local, kmax_local;
    float* kt = nullptr;
    float* kmax = nullptr;
    int64_t kt_from = 0;  // keys [kt_from, N) still to transpose
    if (use_kept) {
      const int64_t groups = B * HKV;
      const bool extend = state_in == kept.data() && kt_n == N - T && kt_groups == groups && kt_cap >= np;
      if (!extend) {  // room for the tokens that decode will append
        kt_n = -1;
        kt_cap = np + (N / 2 + 63) / vw * vw;
        kt_kept.assign((size_t)(groups * D * kt_cap), 0.f);
        kmax_kept.assign((size_t)(groups * D), 0.f);
        kt_groups = groups;
      } else {
        kt_from = N - T;
      }
      np = kt_cap;
      kt = kt_kept.data();
      kmax = kmax_kept.data();
    } else {
      kt_local.resize((size_t)(B * HKV * D * np));
      kmax_local.resize((size_t)(B * HKV * D));
      kt = kt_local.data();
      kmax = kmax_local.data();
    }
    const int64_t per_head = dl_scratch_floats(np, D);
    std::vector<float> scratch((size_t)(B * H * per_head));
    std::vector<dl_head_args> args((size_t)(B * H));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t i = b * H + h, g = b * HKV + h / (H / HKV);
        dl_head_args& a = args[(size_t)i];
        a.t = T;
        a.n = N;
        a.d = D;
        a.window = window;
        a.sinks = sinks;
        a.scale = scale;
        a.softcap = softcap;
        a.span = span;
        a.theta_q = thq.data() + h * D;
        a.theta_v = thv[(size_t)h];
        a.q = q.data + i * T * D;
        a.kt = kt + g * D * np;
        a.kmax = kmax + g * D;
        a.n_pad = np;
        a.k = k.data + g * N * D;
        a.v = v.data + g * N * D;
        a.state_in = state_in ? state_in + i * (hdr + 2 * (N - T)) : nullptr;
        a.state_out = sp ? sp + i * (hdr + 2 * N) : nullptr;
        a.y = yp + i * T * D;
        a.scratch = scratch.data() + i * per_head;
      }

    struct Job {
      const dl_table* table;
      const float* k;
      float* kt;
      float* kmax;
      int64_t n, d, np, from;
      dl_head_args* args;
    } job{tb, k.data, kt, kmax, N, D, np, kt_from, args.data()};
    auto transpose = [](void* p, size_t i) {
      Job* j = static_cast<Job*>(p);
      const float* k = j->k + (int64_t)i * j->n * j->d;
      float* kt = j->kt + (int64_t)i * j->d * j->np;
      float* kmax = j->kmax + (int64_t)i * j->d;
      if (j->from == 0) {
        j->table->transpose(k, j->n, j->d, j->np, kt, kmax);
        return;
      }
      for (int64_t c = 0; c < j->d; ++c) {  // append the new keys; the columns after them stay zero
        float* row = kt + c * j->np;
        for (int64_t r = j->from; r < j->n; ++r) {
          row[r] = k[r * j->d + c];
          kmax[c] = std::fabs(row[r]) > kmax[c] ? std::fabs(row[r]) : kmax[c];
        }
      }
    };
    auto heads = [](void* p, size_t i) {
      Job* j = static_cast<Job*>(p);
      j->table->head(&j->args[i]);
    };
    ctx.ParallelFor(transpose, (size_t)(B * HKV), 0, &job);
    ctx.ParallelFor(heads, (size_t)(B * H), 0, &job);
    if (mp)
      for (int64_t i = 0; i < B * H; ++i)
        for (int c = 0; c < 3; ++c) mp[i * 3 + c] = args[(size_t)i].macs[c];
    if (use_kept) {
      if (next.empty()) next.assign(sp, sp + B * H * (hdr + 2 * N));
      kept.swap(next);
      kept_print = fingerprint(k.data, B * HKV, N, D);
      kept_b = B;
      kept_h = H;
      kept_n = N;
      kept_d = D;
      kt_n = N;
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* c) {
    try {
      Ort::KernelContext ctx(c);
      compute(ctx);
      return nullptr;
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, (where + ": " + e.what()).c_str());
    }
  }
};

struct Op : Ort::CustomOpBase<Op, Kernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new Kernel(info);
      return nullptr;
    } catch (const std::exception& e) {
      *kernel = nullptr;
      return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT,
                                        ("DeltaAttention node '" + node_name(info) + "': " + e.what()).c_str());
    }
  }
  const char* GetName() const { return "DeltaAttention"; }
  size_t GetInputTypeCount() const { return 6; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < 5 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
};

}  // namespace

extern "C" DL_API OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr)
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "deltallm kernels need ONNX Runtime >= 1.21 (C API 21)");
  Ort::InitApi(api);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &domain)) return st;
  static Op op;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &op)) {
    api->ReleaseCustomOpDomain(domain);
    return st;
  }
  return api->AddCustomOpDomain(options, domain);  // the domain must outlive the sessions: kept
}
