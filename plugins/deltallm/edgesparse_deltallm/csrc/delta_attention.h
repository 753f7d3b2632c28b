// Delta attention: the pure kernel (no ONNX Runtime), one copy per ISA in one library.
//
// For each batch row b and query head h (kv head g = h / (H / Hkv)), query rows t = 0..T-1
// sit at positions p = N - T + t and attend keys j <= p. Keys inside the window
// (j > p - window) and the first `sinks` keys get exact scores and weights. The others ("far"
// keys) are approximated with two delta networks:
//   * the query: dimension d of the transmitted query qh is refreshed only when
//     |q_t[d] - qh[d]| > theta_q[h][d]; the far scores sh_j = scale * qh . k_j are then updated
//     with the refreshed dimensions only (|active| MACs per far key instead of D);
//   * the value accumulation U = sum_far wh_j v_j keeps, per far key, the weight wh_j it was
//     last applied with; each row re-applies (D MACs each) only the keys whose current weight
//     exp(sh_j - c) deviates most from wh_j: the refresh threshold is the largest of
//     theta_v[h] * Z * 2^-k (k = 0..9, else 0) under which the deviations left stale add up to
//     at most theta_v[h] * Z (Z: the previous row's softmax denominator, see below).
//   y_t = (U + sum_near w_j v_j) / (sum_far wh_j + sum_near w_j)
// The state carried between calls (decode) is per (b, h): a header of 2 * D + 8 floats
// {valid, c, sum_far wh, n_keys, previous denominator, largest wh, peak of sum_far wh, 0,
// qh[D], U[D]}
// followed by sh[n_keys] and wh[n_keys].
#ifndef EDGESPARSE_DELTALLM_H
#define EDGESPARSE_DELTALLM_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DL_STATE_HEADER(d) (2 * (d) + 8)

typedef struct {
  int64_t t, n, d;              // query rows, keys (cache + new), head dim
  int64_t window, sinks;
  int64_t span;                 // sliding window: keys j <= p - span are not attended (0: none)
  float scale;
  float softcap;                // logits = softcap * tanh(scale q.k / softcap) (0: plain scale q.k)
  const float* theta_q;         // [D] per-dimension query thresholds
  float theta_v;
  const float* q;               // [T, D] this head's queries
  const float* kt;              // [D, n_pad] this kv head's keys, transposed, zero padded
  const float* kmax;            // [D] max |k| per dimension over the keys (unused by the kernel)
  int64_t n_pad;
  const float* k;               // [N, D] row major
  const float* v;               // [N, D]
  const float* state_in;        // header + 2 * (N - T) floats, or NULL (fresh sequence / cold start)
  float* state_out;             // header + 2 * N floats, or NULL
  float* y;                     // [T, D]
  float* scratch;               // dl_scratch_floats(n_pad, d) floats
  int64_t macs[3];              // out: dense causal, QK spent, PV spent
} dl_head_args;

typedef struct {
  const char* isa;
  int vector_floats;
  void (*head)(dl_head_args* a);
  // keys [N, D] -> kt [D, n_pad] (zero padded), kmax[D] = max_j |k[j][d]|
  void (*transpose)(const float* k, int64_t n, int64_t d, int64_t n_pad, float* kt, float* kmax);
  int (*supports)(int64_t d);   // head dims this copy handles
} dl_table;

static inline int64_t dl_scratch_floats(int64_t n_pad, int64_t d) { return (6 + 8) * n_pad + 4 * d + 64; }

const dl_table* dl_kernels(void);          // the widest copy this CPU runs
const dl_table* dl_generic_kernels(void);  // the 16-byte copy (any head dim multiple of 4)

#ifdef __cplusplus
}
#endif

#endif
