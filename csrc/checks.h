// The input checks of every rptq:: op, one function per op, called first by both its CPU wrapper
// (csrc/ops.cpp) and its CUDA wrapper (csrc/cuda/*.cu): the same arguments are rejected on every backend,
// before any kernel reads memory. They mirror the Python checks of the reference (rptq_cli/kernels.py,
// `_check_<op>`); tests/test_kernels_cpu.py::test_every_backend_rejects_the_same_arguments holds them
// together. Failures are TORCH_CHECK_VALUE: Python sees a ValueError that names the op and the argument.
//
// Contents are checked where a wrong value would make a kernel read or write out of bounds: group sizes
// (positive, summing to the channels) and permutation indices. Those live on the device of the data;
// checking CUDA ones costs one small device→host copy per call, except while a CUDA graph is being
// captured (a synchronizing copy is not allowed then): shapes are still checked, contents were checked
// by the eager call that precedes every capture.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <functional>
#include <optional>

#include "layouts.h"

namespace rptq_checks {

using at::Tensor;

#define RPTQ_CHECK_ARG(cond, op, ...) TORCH_CHECK_VALUE(cond, "rptq::", op, ": ", __VA_ARGS__)

constexpr int64_t kFloatBits = 16;  // "bits" of a tensor that stays in floating point (config.FP)

// Whether the current stream of `device` is capturing a CUDA graph; set by the CUDA build (cuda/common.cuh),
// never true for the CPU.
inline std::function<bool(const at::Device&)>& capturing_hook() {
  static std::function<bool(const at::Device&)> hook;
  return hook;
}

inline bool can_read_contents(const Tensor& t) {
  if (t.device().is_cpu()) return true;
  return !(capturing_hook() && capturing_hook()(t.device()));
}

inline bool is_float(const Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}
inline bool is_int(const Tensor& t) { return t.scalar_type() == at::kInt || t.scalar_type() == at::kLong; }

inline void check_bits(const char* op, int64_t bits) {
  RPTQ_CHECK_ARG(bits == 2 || bits == 3 || bits == 4 || bits == 8, op, "bits must be one of (2, 3, 4, 8), got ",
                 bits);
}
inline void check_act_bits(const char* op, int64_t bits) {
  RPTQ_CHECK_ARG(bits >= 1 && bits <= 8, op, "activation bits must be in 1..8, got ", bits);
}

// Every tensor of a call on the device of its first one (the dispatcher picks the kernel from any of them).
inline void check_same_device(const char* op, const Tensor& first, std::initializer_list<std::pair<const Tensor*, const char*>> rest) {
  for (const auto& [t, name] : rest)
    if (t != nullptr && t->defined())
      RPTQ_CHECK_ARG(t->device() == first.device(), op, name, " is on ", t->device(), " but the data is on ",
                     first.device());
}

// group sizes: 1-D int, G entries, each > 0, Σ = total
inline void check_group_sizes(const char* op, const Tensor& gs, int64_t G, int64_t total) {
  RPTQ_CHECK_ARG(gs.dim() == 1 && is_int(gs), op, "group_sizes must be a 1-D int32 tensor, got ", gs.scalar_type(),
                 " ", gs.sizes());
  RPTQ_CHECK_ARG(gs.numel() == G, op, "expected ", G, " group sizes (one per group), got ", gs.numel());
  RPTQ_CHECK_ARG(G >= 1, op, "at least one group is needed");
  if (!can_read_contents(gs)) return;
  // read in place when the sizes are already a contiguous CPU int32 tensor (every call of a model): no copy
  const Tensor g = gs.device().is_cpu() ? gs.contiguous() : gs.to(at::kCPU).contiguous();
  int64_t sum = 0;
  AT_DISPATCH_INDEX_TYPES(g.scalar_type(), "rptq_check_group_sizes", [&] {
    const index_t* p = g.data_ptr<index_t>();
    for (int64_t i = 0; i < G; ++i) {
      RPTQ_CHECK_ARG(p[i] > 0, op, "group sizes must be positive, group ", i, " has ", p[i]);
      sum += p[i];
    }
  });
  RPTQ_CHECK_ARG(sum == total, op, "group sizes sum to ", sum, ", expected ", total);
}

inline void check_bias(const char* op, const std::optional<Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return;
  RPTQ_CHECK_ARG(bias->dim() == 1 && bias->size(0) == N && is_float(*bias), op, "bias must be float [N=", N,
                 "], got ", bias->scalar_type(), " ", bias->sizes());
}

// ---- per op ------------------------------------------------------------------------------------------
inline void check_pack_weight(const char* op, const Tensor& codes, int64_t bits) {
  check_bits(op, bits);
  RPTQ_CHECK_ARG(codes.scalar_type() == at::kByte && codes.dim() == 2, op, "codes must be uint8 [N, K], got ",
                 codes.scalar_type(), " ", codes.sizes());
  if (codes.numel() && can_read_contents(codes))
    RPTQ_CHECK_ARG(codes.max().item<int64_t>() < (int64_t(1) << bits), op, "a code exceeds the ", bits, "-bit range");
}

inline void check_unpack_weight(const char* op, const Tensor& packed, int64_t bits, int64_t N, int64_t K) {
  check_bits(op, bits);
  RPTQ_CHECK_ARG(N >= 0 && K >= 0, op, "N and K must not be negative, got ", N, ", ", K);
  const int64_t rb = rptq_layout::row_bytes(K, bits);
  RPTQ_CHECK_ARG(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.size(0) == N && packed.size(1) == rb,
                 op, "packed must be uint8 [", N, ", ", rb, "], got ", packed.scalar_type(), " ", packed.sizes());
}

// The weight of linear_a16 / linear_aq; returns G.
inline int64_t check_weight(const char* op, const Tensor& x, const Tensor& qweight, const Tensor& scales,
                            const Tensor& zeros, const Tensor& group_sizes, int64_t bits,
                            const std::optional<Tensor>& bias) {
  check_bits(op, bits);
  RPTQ_CHECK_ARG(is_float(x) && x.dim() >= 1, op, "x must be a float32/float16/bfloat16 tensor, got ", x.scalar_type(),
                 " ", x.sizes());
  RPTQ_CHECK_ARG(scales.dim() == 2 && (scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat), op,
                 "scales must be float16/float32 [N, G], got ", scales.scalar_type(), " ", scales.sizes());
  const int64_t K = x.size(-1), N = scales.size(0), G = scales.size(1);
  const int64_t rb = rptq_layout::row_bytes(K, bits);
  RPTQ_CHECK_ARG(qweight.scalar_type() == at::kByte && qweight.dim() == 2, op, "qweight must be 2-D uint8, got ",
                 qweight.scalar_type(), " ", qweight.sizes());
  RPTQ_CHECK_ARG(qweight.size(0) == N && qweight.size(1) == rb, op, "qweight must be [N=", N, ", ", rb, "] for K=", K,
                 " at ", bits, " bits, got ", qweight.sizes());
  RPTQ_CHECK_ARG(zeros.scalar_type() == at::kByte && zeros.dim() == 2 && zeros.size(0) == N && zeros.size(1) == G, op,
                 "zeros must be uint8 [N=", N, ", G=", G, "], got ", zeros.scalar_type(), " ", zeros.sizes());
  check_same_device(op, x, {{&qweight, "qweight"}, {&scales, "scales"}, {&zeros, "zeros"},
                            {&group_sizes, "group_sizes"}, {bias ? &*bias : nullptr, "bias"}});
  check_group_sizes(op, group_sizes, G, K);
  check_bias(op, bias, N);
  return G;
}

inline void check_act(const char* op, const Tensor& x, const Tensor& act_scale, const Tensor& act_zero, int64_t G,
                      int64_t bits) {
  check_act_bits(op, bits);
  RPTQ_CHECK_ARG(is_float(x) && x.dim() >= 1, op, "x must be a float tensor, got ", x.scalar_type());
  RPTQ_CHECK_ARG(act_scale.dim() == 1 && act_scale.numel() == G && act_scale.is_floating_point(), op,
                 "act_scale must be float [", G, "], one entry per group, got ", act_scale.scalar_type(), " ",
                 act_scale.sizes());
  RPTQ_CHECK_ARG(act_zero.dim() == 1 && act_zero.numel() == G && is_int(act_zero), op, "act_zero must be int32 [", G,
                 "], one entry per group, got ", act_zero.scalar_type(), " ", act_zero.sizes());
  check_same_device(op, x, {{&act_scale, "act_scale"}, {&act_zero, "act_zero"}});
}

inline void check_linear_a16(const Tensor& x, const Tensor& qweight, const Tensor& scales, const Tensor& zeros,
                             const Tensor& group_sizes, int64_t bits, const std::optional<Tensor>& bias) {
  check_weight("linear_a16", x, qweight, scales, zeros, group_sizes, bits, bias);
}

inline void check_linear_aq(const Tensor& x, const Tensor& qweight, const Tensor& scales, const Tensor& zeros,
                            const Tensor& group_sizes, int64_t bits, const Tensor& act_scale, const Tensor& act_zero,
                            int64_t act_bits, const std::optional<Tensor>& bias) {
  const int64_t G = check_weight("linear_aq", x, qweight, scales, zeros, group_sizes, bits, bias);
  check_act("linear_aq", x, act_scale, act_zero, G, act_bits);
}

inline void check_fake_quant_act(const Tensor& x, const Tensor& act_scale, const Tensor& act_zero,
                                 const Tensor& act_group_sizes, int64_t bits) {
  const char* op = "fake_quant_act";
  check_act(op, x, act_scale, act_zero, act_group_sizes.numel(), bits);
  check_same_device(op, x, {{&act_group_sizes, "act_group_sizes"}});
  check_group_sizes(op, act_group_sizes, act_group_sizes.numel(), x.size(-1));
}

inline void check_fake_quant_act_token(const Tensor& x, const Tensor& act_group_sizes, const Tensor& clip,
                                       int64_t bits) {
  const char* op = "fake_quant_act_token";
  check_act_bits(op, bits);
  RPTQ_CHECK_ARG(is_float(x) && x.dim() >= 1, op, "x must be a float tensor, got ", x.scalar_type());
  const int64_t G = act_group_sizes.numel();
  RPTQ_CHECK_ARG(clip.dim() == 1 && clip.numel() == G && clip.is_floating_point(), op, "clip must be float [", G,
                 "], one ratio per group, got ", clip.scalar_type(), " ", clip.sizes());
  check_same_device(op, x, {{&act_group_sizes, "act_group_sizes"}, {&clip, "clip"}});
  check_group_sizes(op, act_group_sizes, G, x.size(-1));
}

inline void check_reorder_norm(const Tensor& x, const Tensor& perm, const Tensor& weight,
                               const std::optional<Tensor>& bias) {
  const char* op = "reorder_norm";
  RPTQ_CHECK_ARG(is_float(x) && x.dim() >= 1, op, "x must be a float tensor, got ", x.scalar_type());
  const int64_t C = x.size(-1);
  RPTQ_CHECK_ARG(perm.dim() == 1 && perm.numel() == C && is_int(perm), op, "perm must be an int64 [C=", C,
                 "] tensor, got ", perm.scalar_type(), " ", perm.sizes());
  RPTQ_CHECK_ARG(weight.dim() == 1 && weight.numel() == C && is_float(weight), op, "weight must be float [C=", C,
                 "], got ", weight.scalar_type(), " ", weight.sizes());
  check_same_device(op, x, {{&perm, "perm"}, {&weight, "weight"}, {bias ? &*bias : nullptr, "bias"}});
  check_bias(op, bias, C);
  if (C && can_read_contents(perm)) {
    const Tensor p = perm.device().is_cpu() ? perm.contiguous() : perm.to(at::kCPU).contiguous();
    bool ok = true;
    AT_DISPATCH_INDEX_TYPES(p.scalar_type(), "rptq_check_perm", [&] {
      const index_t* pp = p.data_ptr<index_t>();
      for (int64_t i = 0; i < C; ++i) ok &= (pp[i] >= 0) & (pp[i] < C);
    });
    RPTQ_CHECK_ARG(ok, op, "perm has an index outside [0, C=", C, ")");
  }
}

// Per-channel KV quantizer of H heads of D channels.
inline void check_kv_params(const char* op, const Tensor& data, const Tensor& scale, const Tensor& zero, int64_t H,
                            int64_t D) {
  RPTQ_CHECK_ARG(scale.dim() == 2 && scale.size(0) == H && scale.size(1) == D && scale.is_floating_point(), op,
                 "scale must be float [H=", H, ", D=", D, "], got ", scale.scalar_type(), " ", scale.sizes());
  RPTQ_CHECK_ARG(zero.dim() == 2 && zero.size(0) == H && zero.size(1) == D && is_int(zero), op,
                 "zero must be int32 [H=", H, ", D=", D, "], got ", zero.scalar_type(), " ", zero.sizes());
  check_same_device(op, data, {{&scale, "scale"}, {&zero, "zero"}});
}

inline void check_kv_pack(const Tensor& x, const Tensor& scale, const Tensor& zero, int64_t bits) {
  const char* op = "kv_pack";
  check_bits(op, bits);
  RPTQ_CHECK_ARG(x.dim() == 4 && is_float(x), op, "x must be a float [B, H, T, D], got ", x.scalar_type(), " ",
                 x.sizes());
  check_kv_params(op, x, scale, zero, x.size(1), x.size(3));
}

// Packed K or V codes [B, H, T, row] of D channels (either grid).
inline void check_packed_kv(const char* op, const Tensor& packed, int64_t bits, int64_t D) {
  check_bits(op, bits);
  RPTQ_CHECK_ARG(D >= 0, op, "D must not be negative, got ", D);
  const int64_t rb = rptq_layout::row_bytes(D, bits);
  RPTQ_CHECK_ARG(packed.scalar_type() == at::kByte && packed.dim() == 4 && packed.size(3) == rb, op,
                 "packed must be uint8 [B, H, T, ", rb, "] (rows of kv_row_bytes(", D, ", ", bits, ")), got ",
                 packed.scalar_type(), " ", packed.sizes());
}

inline void check_kv_unpack(const Tensor& packed, const Tensor& scale, const Tensor& zero, int64_t bits, int64_t D) {
  const char* op = "kv_unpack";
  check_packed_kv(op, packed, bits, D);
  check_kv_params(op, packed, scale, zero, packed.size(1), D);
}

// x [B, H, T, D] against the codes of a KV cache it is written into at `pos` (either grid).
inline void check_append(const char* op, const Tensor& cache, const Tensor& x, int64_t bits, int64_t pos) {
  check_bits(op, bits);
  RPTQ_CHECK_ARG(x.dim() == 4 && is_float(x), op, "x must be a float [B, H, T, D], got ", x.scalar_type(), " ",
                 x.sizes());
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), rb = rptq_layout::row_bytes(x.size(3), bits);
  RPTQ_CHECK_ARG(cache.scalar_type() == at::kByte && cache.dim() == 4 && cache.size(0) == B && cache.size(1) == H &&
                     cache.size(3) == rb,
                 op, "cache must be uint8 [B=", B, ", H=", H, ", S, ", rb, "], got ", cache.scalar_type(), " ",
                 cache.sizes());
  RPTQ_CHECK_ARG(cache.is_contiguous(), op, "cache must be contiguous (it is written in place)");
  RPTQ_CHECK_ARG(pos >= 0 && pos + T <= cache.size(2), op, "positions ", pos, "..", pos + T,
                 " do not fit a cache of ", cache.size(2));
  check_same_device(op, x, {{&cache, "cache"}});
}

inline void check_kv_append(const Tensor& cache, const Tensor& x, const Tensor& scale, const Tensor& zero,
                            int64_t bits, int64_t pos) {
  const char* op = "kv_append";
  check_append(op, cache, x, bits, pos);
  check_kv_params(op, x, scale, zero, x.size(1), x.size(3));
}

// q against the packed K/V codes of decode attention (either grid).
inline void check_attention_cache(const char* op, const Tensor& q, const Tensor& k_packed, const Tensor& v_packed,
                                  int64_t bits, int64_t kv_len, int64_t p_bits) {
  check_bits(op, bits);
  RPTQ_CHECK_ARG(q.dim() == 4 && is_float(q), op, "q must be a float [B, Hq, Tq, D], got ", q.scalar_type(), " ",
                 q.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), rb = rptq_layout::row_bytes(q.size(3), bits);
  for (const auto& [t, name] : {std::pair{&k_packed, "k_packed"}, std::pair{&v_packed, "v_packed"}})
    RPTQ_CHECK_ARG(t->scalar_type() == at::kByte && t->dim() == 4 && t->size(0) == B && t->size(3) == rb, op, name,
                   " must be uint8 [B=", B, ", Hkv, S, ", rb, "], got ", t->scalar_type(), " ", t->sizes());
  RPTQ_CHECK_ARG(k_packed.sizes() == v_packed.sizes(), op, "k_packed and v_packed differ in shape");
  const int64_t Hkv = k_packed.size(1), S = k_packed.size(2);
  RPTQ_CHECK_ARG(Hkv >= 1 && Hq % Hkv == 0, op, "Hq=", Hq, " is not a multiple of Hkv=", Hkv);
  RPTQ_CHECK_ARG(Tq <= kv_len && kv_len <= S, op, "need Tq=", Tq, " <= kv_len=", kv_len, " <= S=", S);
  RPTQ_CHECK_ARG(p_bits >= 1 && p_bits <= kFloatBits, op, "p_bits must be in 1..", kFloatBits, ", got ", p_bits);
  check_same_device(op, q, {{&k_packed, "k_packed"}, {&v_packed, "v_packed"}});
}

inline void check_decode_attention(const Tensor& q, const Tensor& k_packed, const Tensor& v_packed,
                                   const Tensor& k_scale, const Tensor& k_zero, const Tensor& v_scale,
                                   const Tensor& v_zero, int64_t bits, int64_t kv_len, int64_t p_bits) {
  const char* op = "decode_attention";
  check_attention_cache(op, q, k_packed, v_packed, bits, kv_len, p_bits);
  const int64_t Hkv = k_packed.size(1);
  check_kv_params(op, q, k_scale, k_zero, Hkv, q.size(3));
  check_kv_params(op, q, v_scale, v_zero, Hkv, q.size(3));
}

// ---- the KV cache on per-token grids (kernels.py: kv_append_token, kv_unpack_token, decode_attention_token)

// group_sizes int32 [H, G] (≥ 0, each row summing to D) and, when given, clip float32 [H, G]; returns G.
inline int64_t check_kv_token_groups(const char* op, const Tensor& data, const Tensor& group_sizes,
                                     const Tensor* clip, int64_t H, int64_t D) {
  RPTQ_CHECK_ARG(group_sizes.dim() == 2 && group_sizes.size(0) == H && is_int(group_sizes), op,
                 "group_sizes must be int32 [H=", H, ", G], got ", group_sizes.scalar_type(), " ", group_sizes.sizes());
  const int64_t G = group_sizes.size(1);
  RPTQ_CHECK_ARG(G >= 1, op, "at least one group per head is needed");
  check_same_device(op, data, {{&group_sizes, "group_sizes"}, {clip, "clip"}});
  if (clip != nullptr)
    RPTQ_CHECK_ARG(clip->dim() == 2 && clip->size(0) == H && clip->size(1) == G && clip->scalar_type() == at::kFloat,
                   op, "clip must be float32 [H=", H, ", G=", G, "], got ", clip->scalar_type(), " ", clip->sizes());
  if (can_read_contents(group_sizes)) {
    const Tensor sizes = group_sizes.to(at::kCPU, at::kLong).contiguous();
    const int64_t* g = sizes.data_ptr<int64_t>();
    for (int64_t h = 0; h < H; ++h) {
      int64_t total = 0;
      for (int64_t j = 0; j < G; ++j) {
        RPTQ_CHECK_ARG(g[h * G + j] >= 0, op, "group sizes must not be negative");
        total += g[h * G + j];
      }
      RPTQ_CHECK_ARG(total == D, op, "each head's group sizes must sum to D=", D, ", head ", h, " sums to ", total);
    }
  }
  return G;
}

inline void check_kv_token_params(const char* op, const Tensor& data, const Tensor& scale, const Tensor& zero,
                                  int64_t B, int64_t H, int64_t S, int64_t G) {
  RPTQ_CHECK_ARG(scale.scalar_type() == at::kHalf && scale.dim() == 4 && scale.size(0) == B && scale.size(1) == H &&
                     scale.size(2) == S && scale.size(3) == G,
                 op, "scale must be float16 [B=", B, ", H=", H, ", S=", S, ", G=", G, "], got ", scale.scalar_type(),
                 " ", scale.sizes());
  RPTQ_CHECK_ARG(zero.scalar_type() == at::kByte && zero.sizes() == scale.sizes(), op, "zero must be uint8 [B=", B,
                 ", H=", H, ", S=", S, ", G=", G, "], got ", zero.scalar_type(), " ", zero.sizes());
  check_same_device(op, data, {{&scale, "scale"}, {&zero, "zero"}});
}

inline void check_kv_append_token(const Tensor& cache, const Tensor& scale, const Tensor& zero, const Tensor& x,
                                  const Tensor& group_sizes, const Tensor& clip, int64_t bits, int64_t pos) {
  const char* op = "kv_append_token";
  check_append(op, cache, x, bits, pos);
  RPTQ_CHECK_ARG(scale.is_contiguous() && zero.is_contiguous(), op,
                 "scale and zero must be contiguous (they are written in place)");
  const int64_t B = x.size(0), H = x.size(1);
  const int64_t G = check_kv_token_groups(op, x, group_sizes, &clip, H, x.size(3));
  check_kv_token_params(op, x, scale, zero, B, H, cache.size(2), G);
}

inline void check_kv_unpack_token(const Tensor& packed, const Tensor& scale, const Tensor& zero,
                                  const Tensor& group_sizes, int64_t bits, int64_t D) {
  const char* op = "kv_unpack_token";
  check_packed_kv(op, packed, bits, D);
  const int64_t G = check_kv_token_groups(op, packed, group_sizes, nullptr, packed.size(1), D);
  check_kv_token_params(op, packed, scale, zero, packed.size(0), packed.size(1), packed.size(2), G);
}

inline void check_decode_attention_token(const Tensor& q, const Tensor& k_packed, const Tensor& v_packed,
                                         const Tensor& k_scale, const Tensor& k_zero, const Tensor& v_scale,
                                         const Tensor& v_zero, const Tensor& k_group_sizes,
                                         const Tensor& v_group_sizes, int64_t bits, int64_t kv_len, int64_t p_bits) {
  const char* op = "decode_attention_token";
  check_attention_cache(op, q, k_packed, v_packed, bits, kv_len, p_bits);
  const int64_t B = q.size(0), D = q.size(3), Hkv = k_packed.size(1), S = k_packed.size(2);
  const int64_t Gk = check_kv_token_groups(op, q, k_group_sizes, nullptr, Hkv, D);
  const int64_t Gv = check_kv_token_groups(op, q, v_group_sizes, nullptr, Hkv, D);
  check_kv_token_params(op, q, k_scale, k_zero, B, Hkv, S, Gk);
  check_kv_token_params(op, q, v_scale, v_zero, B, Hkv, S, Gv);
}

}  // namespace rptq_checks
