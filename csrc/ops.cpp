// CPU implementations of the rptq:: ops (schemas are defined in rptq_cli/kernels.py, before this
// extension is imported; here we only register kernels with TORCH_LIBRARY_IMPL). Each wrapper checks
// its tensors (dtype, device, contiguity, shapes, group sizes) with TORCH_CHECK — a RuntimeError
// with a message — before any kernel touches memory, converts activations to float32, and calls the
// kernel table chosen at run time from the CPU flags (cpu/kernels.h).
//
// CUDA kernels (csrc/cuda/*.cu) register themselves the same way with TORCH_LIBRARY_IMPL(rptq, CUDA, m).
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "cpu/kernels.h"

namespace {

using at::Tensor;
using rptq_cpu::KernelTable;
using rptq_cpu::row_bytes;

KernelTable make_table(const std::string& want) {
  KernelTable t{};
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx512 && (want.empty() || want == "amx") && rptq_cpu::amx_usable()) {
    rptq_cpu::fill_amx(&t);
  } else if (avx512 && (want.empty() || want == "amx" || want == "avx512vnni" || want == "avx512")) {
    rptq_cpu::fill_avx512(&t);
  } else if (avx2 && (want.empty() || want != "scalar")) {
    rptq_cpu::fill_avx2(&t);
  } else {
    rptq_cpu::fill_scalar(&t);
  }
  return t;
}

KernelTable& table() {
  static KernelTable t = [] {
    const char* env = std::getenv("RPTQ_CPU_ISA");
    return make_table(env ? env : "");
  }();
  return t;
}

// ---- checks -----------------------------------------------------------------------------------------
void check_cpu(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "rptq::", op, ": ", name, " must be a CPU tensor");
}

void check_bits(int64_t bits, const char* op) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "rptq::", op, ": bits must be 2, 3, 4 or 8, got ",
              bits);
}

bool is_float(const Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

Tensor f32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }
Tensor i32(const Tensor& t) { return t.to(at::kInt).contiguous(); }

// group sizes: 1-D int, G entries, positive, Σ = total
Tensor check_groups(const Tensor& gs, int64_t G, int64_t total, const char* op) {
  check_cpu(gs, op, "group_sizes");
  TORCH_CHECK(gs.dim() == 1 && (gs.scalar_type() == at::kInt || gs.scalar_type() == at::kLong),
              "rptq::", op, ": group_sizes must be a 1-D int32 tensor");
  TORCH_CHECK(gs.numel() == G, "rptq::", op, ": expected ", G, " group sizes, got ", gs.numel());
  Tensor g = i32(gs);
  const int32_t* p = g.data_ptr<int32_t>();
  int64_t sum = 0;
  for (int64_t i = 0; i < G; ++i) {
    TORCH_CHECK(p[i] > 0, "rptq::", op, ": group sizes must be positive, group ", i, " has ", p[i]);
    sum += p[i];
  }
  TORCH_CHECK(sum == total, "rptq::", op, ": group sizes sum to ", sum, ", expected ", total);
  return g;
}

struct Weight {
  Tensor qw, scales, zeros, gs;
  int64_t N, K, G;
};

Weight check_weight(const Tensor& x, const Tensor& qw, const Tensor& scales, const Tensor& zeros,
                    const Tensor& gs, int64_t bits, const char* op) {
  check_bits(bits, op);
  for (auto [t, name] : {std::pair{&x, "x"}, {&qw, "qweight"}, {&scales, "scales"}, {&zeros, "zeros"}})
    check_cpu(*t, op, name);
  TORCH_CHECK(is_float(x) && x.dim() >= 1, "rptq::", op, ": x must be a float tensor, got ", x.scalar_type());
  TORCH_CHECK(scales.dim() == 2 && (scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat),
              "rptq::", op, ": scales must be float16/float32 [N, G]");
  const int64_t K = x.size(-1), N = scales.size(0), G = scales.size(1);
  TORCH_CHECK(qw.scalar_type() == at::kByte && qw.dim() == 2 && qw.size(0) == N && qw.size(1) == row_bytes(K, bits),
              "rptq::", op, ": qweight must be uint8 [", N, ", ", row_bytes(K, bits), "] for K=", K, " at ", bits,
              " bits, got ", qw.sizes());
  TORCH_CHECK(zeros.scalar_type() == at::kByte && zeros.dim() == 2 && zeros.size(0) == N && zeros.size(1) == G,
              "rptq::", op, ": zeros must be uint8 [", N, ", ", G, "]");
  Weight w{qw.contiguous(), f32(scales), zeros.contiguous(), check_groups(gs, G, K, op), N, K, G};
  return w;
}

Tensor check_bias(const std::optional<Tensor>& bias, int64_t N, const char* op) {
  if (!bias.has_value()) return Tensor();
  check_cpu(*bias, op, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && is_float(*bias), "rptq::", op, ": bias must be float [", N, "]");
  return f32(*bias);
}

std::vector<int64_t> out_shape(const Tensor& x, int64_t last) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = last;
  return s;
}

// ---- ops ----------------------------------------------------------------------------------------------
Tensor pack_weight(const Tensor& codes, int64_t bits) {
  check_bits(bits, "pack_weight");
  check_cpu(codes, "pack_weight", "codes");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2, "rptq::pack_weight: codes must be uint8 [N, K]");
  Tensor c = codes.contiguous();
  if (c.numel())
    TORCH_CHECK(c.max().item<int64_t>() < (int64_t(1) << bits), "rptq::pack_weight: a code exceeds the ", bits,
                "-bit range");
  const int64_t N = c.size(0), K = c.size(1);
  Tensor out = at::empty({N, row_bytes(K, bits)}, c.options());
  table().pack_rows(c.data_ptr<uint8_t>(), N, K, int(bits), out.data_ptr<uint8_t>());
  return out;
}

Tensor unpack_weight(const Tensor& packed, int64_t bits, int64_t N, int64_t K) {
  check_bits(bits, "unpack_weight");
  check_cpu(packed, "unpack_weight", "packed");
  TORCH_CHECK(N >= 0 && K >= 0, "rptq::unpack_weight: negative shape");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.size(0) == N &&
                  packed.size(1) == row_bytes(K, bits),
              "rptq::unpack_weight: packed must be uint8 [", N, ", ", row_bytes(K, bits), "], got ", packed.sizes());
  Tensor p = packed.contiguous();
  Tensor out = at::empty({N, K}, p.options());
  table().unpack_rows(p.data_ptr<uint8_t>(), N, K, int(bits), out.data_ptr<uint8_t>());
  return out;
}

// Rows at or below this run the GEMV kernel (decode); above, the GEMM path (prefill).
constexpr int64_t kGemvMaxRows = 8;

// The prefill path's float32 weight slab (≤ kSlabBytes), kept between calls by each calling thread: a fresh
// 32 MiB allocation took ~8 ms of page faults per call on the development machine, more than dequantizing
// into it.
constexpr int64_t kSlabBytes = int64_t(32) << 20;

Tensor slab_scratch(int64_t numel) {
  thread_local Tensor buffer;
  if (!buffer.defined() || buffer.numel() < numel) {
    buffer = Tensor();  // free the old one first: the peak is one buffer, not two
    buffer = at::empty({numel}, at::TensorOptions().dtype(at::kFloat));
  }
  return buffer.narrow(0, 0, numel);
}

// y [M, N] float32 = x2 [M, K] float32 @ W.T + b
Tensor run_linear_a16(const Tensor& x2, const Weight& w, const Tensor& b, int64_t bits) {
  const int64_t M = x2.size(0);
  if (M <= kGemvMaxRows || w.K == 0) {
    Tensor y = at::empty({M, w.N}, x2.options());
    table().linear_a16(x2.data_ptr<float>(), M, w.qw.data_ptr<uint8_t>(), w.scales.data_ptr<float>(),
                       w.zeros.data_ptr<uint8_t>(), w.gs.data_ptr<int32_t>(), int(w.G), w.N, w.K, int(bits),
                       b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>());
    return y;
  }
  // Prefill: dequantize slabs of rows (bounded memory) and multiply with torch's sgemm, each slab straight
  // into its columns of y.
  Tensor y = at::empty({M, w.N}, x2.options());
  const int64_t slab = std::min(w.N, std::max<int64_t>(64, kSlabBytes / std::max<int64_t>(1, w.K * 4)));
  Tensor wf = slab_scratch(slab * w.K).view({slab, w.K});
  const int64_t rb = row_bytes(w.K, bits);
  for (int64_t n0 = 0; n0 < w.N; n0 += slab) {
    const int64_t n = std::min(slab, w.N - n0);
    Tensor wn = wf.narrow(0, 0, n);
    table().dequant_weight(w.qw.data_ptr<uint8_t>() + n0 * rb, w.scales.data_ptr<float>() + n0 * w.G,
                           w.zeros.data_ptr<uint8_t>() + n0 * w.G, w.gs.data_ptr<int32_t>(), int(w.G), n, w.K,
                           int(bits), wn.data_ptr<float>());
    Tensor yn = y.narrow(1, n0, n);
    at::mm_out(yn, x2, wn.t());
  }
  return b.defined() ? y.add_(b) : y;
}

Tensor linear_a16(const Tensor& x, const Tensor& qweight, const Tensor& scales, const Tensor& zeros,
                  const Tensor& group_sizes, int64_t bits, const std::optional<Tensor>& bias) {
  Weight w = check_weight(x, qweight, scales, zeros, group_sizes, bits, "linear_a16");
  Tensor b = check_bias(bias, w.N, "linear_a16");
  Tensor y = run_linear_a16(f32(x).reshape({-1, w.K}), w, b, bits);
  return y.to(x.scalar_type()).reshape(out_shape(x, w.N));
}

struct Act {
  Tensor scale, zero;
};

Act check_act(const Tensor& x, const Tensor& act_scale, const Tensor& act_zero, int64_t G, int64_t bits,
              const char* op) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "rptq::", op, ": activation bits must be in 1..8, got ", bits);
  check_cpu(act_scale, op, "act_scale");
  check_cpu(act_zero, op, "act_zero");
  TORCH_CHECK(is_float(x), "rptq::", op, ": x must be a float tensor, got ", x.scalar_type());
  TORCH_CHECK(act_scale.dim() == 1 && act_scale.numel() == G && act_scale.is_floating_point(), "rptq::", op,
              ": act_scale must be float [", G, "]");
  TORCH_CHECK(act_zero.dim() == 1 && act_zero.numel() == G &&
                  (act_zero.scalar_type() == at::kInt || act_zero.scalar_type() == at::kLong),
              "rptq::", op, ": act_zero must be int32 [", G, "]");
  return {f32(act_scale), i32(act_zero)};
}

Tensor linear_aq(const Tensor& x, const Tensor& qweight, const Tensor& scales, const Tensor& zeros,
                 const Tensor& group_sizes, int64_t bits, const Tensor& act_scale, const Tensor& act_zero,
                 int64_t act_bits, const std::optional<Tensor>& bias) {
  Weight w = check_weight(x, qweight, scales, zeros, group_sizes, bits, "linear_aq");
  Act a = check_act(x, act_scale, act_zero, w.G, act_bits, "linear_aq");
  Tensor b = check_bias(bias, w.N, "linear_aq");
  Tensor x2 = f32(x).reshape({-1, w.K});
  const int64_t M = x2.size(0);
  if (M <= kGemvMaxRows || bits > 4 || table().linear_aq == nullptr || w.K == 0) {
    // Decode (the weight stream dominates), 8-bit weights (no s8 operand) or no VNNI: the same math as
    // fake_quant(x) then the W·A16 kernels.
    Tensor fq = at::empty_like(x2);
    table().quantize_act(x2.data_ptr<float>(), M, w.K, a.scale.data_ptr<float>(), a.zero.data_ptr<int32_t>(),
                         w.gs.data_ptr<int32_t>(), int(w.G), int(act_bits), nullptr, fq.data_ptr<float>());
    return run_linear_a16(fq, w, b, bits).to(x.scalar_type()).reshape(out_shape(x, w.N));
  }
  Tensor y = at::empty({M, w.N}, x2.options());
  table().linear_aq(x2.data_ptr<float>(), M, w.qw.data_ptr<uint8_t>(), w.scales.data_ptr<float>(),
                    w.zeros.data_ptr<uint8_t>(), w.gs.data_ptr<int32_t>(), int(w.G), w.N, w.K, int(bits),
                    a.scale.data_ptr<float>(), a.zero.data_ptr<int32_t>(), int(act_bits),
                    b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>());
  return y.to(x.scalar_type()).reshape(out_shape(x, w.N));
}

std::pair<Tensor, Tensor> quant_common(const Tensor& x, const Tensor& act_scale, const Tensor& act_zero,
                                       const Tensor& gs, int64_t bits, bool codes, const char* op) {
  check_cpu(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, "rptq::", op, ": x must have at least one dim");
  const int64_t C = x.size(-1);
  Act a = check_act(x, act_scale, act_zero, gs.numel(), bits, op);
  Tensor g = check_groups(gs, gs.numel(), C, op);
  Tensor x2 = f32(x).reshape({-1, C});
  const int64_t rows = x2.size(0);
  Tensor out = codes ? at::empty({rows, C}, x2.options().dtype(at::kByte)) : at::empty({rows, C}, x2.options());
  table().quantize_act(x2.data_ptr<float>(), rows, C, a.scale.data_ptr<float>(), a.zero.data_ptr<int32_t>(),
                       g.data_ptr<int32_t>(), int(g.numel()), int(bits), codes ? out.data_ptr<uint8_t>() : nullptr,
                       codes ? nullptr : out.data_ptr<float>());
  return {out, x2};
}

Tensor quantize_act(const Tensor& x, const Tensor& act_scale, const Tensor& act_zero, const Tensor& gs,
                    int64_t bits) {
  return quant_common(x, act_scale, act_zero, gs, bits, true, "quantize_act").first.reshape(x.sizes());
}

Tensor fake_quant_act(const Tensor& x, const Tensor& act_scale, const Tensor& act_zero, const Tensor& gs,
                      int64_t bits) {
  return quant_common(x, act_scale, act_zero, gs, bits, false, "fake_quant_act")
      .first.to(x.scalar_type())
      .reshape(x.sizes());
}

Tensor fake_quant_act_token(const Tensor& x, const Tensor& gs, const Tensor& clip, int64_t bits) {
  const char* op = "fake_quant_act_token";
  check_cpu(x, op, "x");
  TORCH_CHECK(is_float(x) && x.dim() >= 1, "rptq::", op, ": x must be a float tensor, got ", x.scalar_type());
  TORCH_CHECK(bits >= 1 && bits <= 8, "rptq::", op, ": activation bits must be in 1..8, got ", bits);
  const int64_t C = x.size(-1);
  Tensor g = check_groups(gs, gs.numel(), C, op);
  check_cpu(clip, op, "clip");
  TORCH_CHECK(clip.dim() == 1 && clip.numel() == g.numel() && clip.is_floating_point(), "rptq::", op,
              ": clip must be float [", g.numel(), "], one ratio per group");
  Tensor r = f32(clip);
  Tensor x2 = f32(x).reshape({-1, C});
  Tensor out = at::empty_like(x2);
  table().quantize_act_token(x2.data_ptr<float>(), x2.size(0), C, g.data_ptr<int32_t>(), r.data_ptr<float>(),
                             int(g.numel()), int(bits), out.data_ptr<float>());
  return out.to(x.scalar_type()).reshape(x.sizes());
}

Tensor reorder_norm(const Tensor& x, const Tensor& perm, const Tensor& weight, const std::optional<Tensor>& bias,
                    double eps, bool rms, const std::optional<Tensor>& act_scale,
                    const std::optional<Tensor>& act_zero, const std::optional<Tensor>& act_group_sizes,
                    int64_t act_bits) {
  const char* op = "reorder_norm";
  check_cpu(x, op, "x");
  TORCH_CHECK(is_float(x) && x.dim() >= 1, "rptq::reorder_norm: x must be a float tensor");
  const int64_t C = x.size(-1);
  check_cpu(perm, op, "perm");
  check_cpu(weight, op, "weight");
  TORCH_CHECK(perm.dim() == 1 && perm.numel() == C && (perm.scalar_type() == at::kLong || perm.scalar_type() == at::kInt),
              "rptq::reorder_norm: perm must be int64 [", C, "]");
  Tensor p = perm.to(at::kLong).contiguous();
  {
    const int64_t* pp = p.data_ptr<int64_t>();
    bool ok = true;
    for (int64_t i = 0; i < C; ++i) ok &= (pp[i] >= 0) & (pp[i] < C);
    TORCH_CHECK(ok, "rptq::reorder_norm: perm has an index outside [0, ", C, ")");
  }
  TORCH_CHECK(weight.dim() == 1 && weight.numel() == C && is_float(weight), "rptq::reorder_norm: weight must be float [",
              C, "]");
  Tensor b = check_bias(bias, C, op);
  Tensor as, az, ag;
  int64_t G = 0;
  if (act_bits < 16) {
    TORCH_CHECK(act_scale.has_value() && act_zero.has_value() && act_group_sizes.has_value(),
                "rptq::reorder_norm: act_bits < 16 needs act_scale, act_zero and act_group_sizes");
    G = act_group_sizes->numel();
    Act a = check_act(x, *act_scale, *act_zero, G, act_bits, op);
    as = a.scale;
    az = a.zero;
    ag = check_groups(*act_group_sizes, G, C, op);
  }
  Tensor x2 = f32(x).reshape({-1, C});
  Tensor w = f32(weight);
  Tensor y = at::empty_like(x2);
  table().reorder_norm(x2.data_ptr<float>(), x2.size(0), C, p.data_ptr<int64_t>(), w.data_ptr<float>(),
                       b.defined() ? b.data_ptr<float>() : nullptr, float(eps), rms ? 1 : 0,
                       G ? as.data_ptr<float>() : nullptr, G ? az.data_ptr<int32_t>() : nullptr,
                       G ? ag.data_ptr<int32_t>() : nullptr, int(G), int(act_bits), y.data_ptr<float>());
  return y.to(x.scalar_type()).reshape(x.sizes());
}

struct KvParams {
  Tensor scale, zero;
};

KvParams check_kv_params(const Tensor& scale, const Tensor& zero, int64_t H, int64_t D, const char* op) {
  check_cpu(scale, op, "scale");
  check_cpu(zero, op, "zero");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == H && scale.size(1) == D && scale.is_floating_point(), "rptq::", op,
              ": scale must be float [", H, ", ", D, "], got ", scale.sizes());
  TORCH_CHECK(zero.dim() == 2 && zero.size(0) == H && zero.size(1) == D &&
                  (zero.scalar_type() == at::kInt || zero.scalar_type() == at::kLong),
              "rptq::", op, ": zero must be int32 [", H, ", ", D, "]");
  return {f32(scale), i32(zero)};
}

void kv_write(const Tensor& x, const KvParams& kv, int64_t bits, uint8_t* out, int64_t out_slab) {
  Tensor xf = f32(x);
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  table().kv_pack(xf.data_ptr<float>(), B * H, H, T, D, kv.scale.data_ptr<float>(), kv.zero.data_ptr<int32_t>(),
                  int(bits), out, out_slab);
}

Tensor kv_pack(const Tensor& x, const Tensor& scale, const Tensor& zero, int64_t bits) {
  check_bits(bits, "kv_pack");
  check_cpu(x, "kv_pack", "x");
  TORCH_CHECK(x.dim() == 4 && is_float(x), "rptq::kv_pack: x must be float [B, H, T, D]");
  KvParams kv = check_kv_params(scale, zero, x.size(1), x.size(3), "kv_pack");
  const int64_t rb = row_bytes(x.size(3), bits);
  Tensor out = at::empty({x.size(0), x.size(1), x.size(2), rb}, x.options().dtype(at::kByte));
  kv_write(x, kv, bits, out.data_ptr<uint8_t>(), x.size(2) * rb);
  return out;
}

void kv_append(const Tensor& cache, const Tensor& x, const Tensor& scale, const Tensor& zero, int64_t bits,
               int64_t pos) {
  check_bits(bits, "kv_append");
  check_cpu(x, "kv_append", "x");
  check_cpu(cache, "kv_append", "cache");
  TORCH_CHECK(x.dim() == 4 && is_float(x), "rptq::kv_append: x must be float [B, H, T, D]");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), rb = row_bytes(D, bits);
  TORCH_CHECK(cache.scalar_type() == at::kByte && cache.dim() == 4 && cache.size(0) == B && cache.size(1) == H &&
                  cache.size(3) == rb && cache.is_contiguous(),
              "rptq::kv_append: cache must be a contiguous uint8 [", B, ", ", H, ", S, ", rb, "], got ", cache.sizes());
  TORCH_CHECK(pos >= 0 && pos + T <= cache.size(2), "rptq::kv_append: positions ", pos, "..", pos + T,
              " do not fit a cache of ", cache.size(2));
  KvParams kv = check_kv_params(scale, zero, H, D, "kv_append");
  kv_write(x, kv, bits, cache.data_ptr<uint8_t>() + pos * rb, cache.size(2) * rb);
}

Tensor kv_unpack(const Tensor& packed, const Tensor& scale, const Tensor& zero, int64_t bits, int64_t D) {
  check_bits(bits, "kv_unpack");
  check_cpu(packed, "kv_unpack", "packed");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 4 && packed.size(3) == row_bytes(D, bits),
              "rptq::kv_unpack: packed must be uint8 [B, H, T, ", row_bytes(D, bits), "]");
  KvParams kv = check_kv_params(scale, zero, packed.size(1), D, "kv_unpack");
  Tensor p = packed.contiguous();
  Tensor out = at::empty({p.size(0), p.size(1), p.size(2), D}, p.options().dtype(at::kFloat));
  table().kv_unpack(p.data_ptr<uint8_t>(), p.size(0) * p.size(1), p.size(1), p.size(2), D, kv.scale.data_ptr<float>(),
                    kv.zero.data_ptr<int32_t>(), int(bits), out.data_ptr<float>());
  return out;
}

Tensor decode_attention(const Tensor& q, const Tensor& k_packed, const Tensor& v_packed, const Tensor& k_scale,
                        const Tensor& k_zero, const Tensor& v_scale, const Tensor& v_zero, int64_t bits,
                        int64_t kv_len, double scaling, int64_t p_bits) {
  const char* op = "decode_attention";
  check_bits(bits, op);
  check_cpu(q, op, "q");
  check_cpu(k_packed, op, "k_packed");
  check_cpu(v_packed, op, "v_packed");
  TORCH_CHECK(q.dim() == 4 && is_float(q), "rptq::decode_attention: q must be float [B, Hq, Tq, D]");
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3), rb = row_bytes(D, bits);
  for (const Tensor* t : {&k_packed, &v_packed})
    TORCH_CHECK(t->scalar_type() == at::kByte && t->dim() == 4 && t->size(0) == B && t->size(3) == rb,
                "rptq::decode_attention: packed K/V must be uint8 [", B, ", Hkv, S, ", rb, "], got ", t->sizes());
  TORCH_CHECK(k_packed.sizes() == v_packed.sizes(), "rptq::decode_attention: K and V caches differ in shape");
  const int64_t Hkv = k_packed.size(1), S = k_packed.size(2);
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, "rptq::decode_attention: Hq=", Hq, " is not a multiple of Hkv=", Hkv);
  TORCH_CHECK(Tq <= kv_len && kv_len <= S, "rptq::decode_attention: need Tq=", Tq, " <= kv_len=", kv_len, " <= S=", S);
  TORCH_CHECK(p_bits >= 1 && p_bits <= 16, "rptq::decode_attention: p_bits must be in 1..16");
  KvParams kk = check_kv_params(k_scale, k_zero, Hkv, D, op);
  KvParams vv = check_kv_params(v_scale, v_zero, Hkv, D, op);
  Tensor qf = f32(q), kp = k_packed.contiguous(), vp = v_packed.contiguous();
  Tensor out = at::empty_like(qf);
  table().decode_attention(qf.data_ptr<float>(), B, Hq, Tq, D, kp.data_ptr<uint8_t>(), vp.data_ptr<uint8_t>(), Hkv, S,
                           kk.scale.data_ptr<float>(), kk.zero.data_ptr<int32_t>(), vv.scale.data_ptr<float>(),
                           vv.zero.data_ptr<int32_t>(), int(bits), kv_len, float(scaling), int(p_bits),
                           out.data_ptr<float>());
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(rptq, CPU, m) {
  m.impl("pack_weight", &pack_weight);
  m.impl("unpack_weight", &unpack_weight);
  m.impl("linear_a16", &linear_a16);
  m.impl("linear_aq", &linear_aq);
  m.impl("quantize_act", &quantize_act);
  m.impl("fake_quant_act", &fake_quant_act);
  m.impl("fake_quant_act_token", &fake_quant_act_token);
  m.impl("reorder_norm", &reorder_norm);
  m.impl("kv_pack", &kv_pack);
  m.impl("kv_unpack", &kv_unpack);
  m.impl("kv_append", &kv_append);
  m.impl("decode_attention", &decode_attention);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rptq compiled kernels (ops are registered under torch.ops.rptq)";
  m.def("cpu_isa", [] { return std::string(table().isa); }, "ISA of the CPU kernels in use: amx, avx512vnni, avx2 or scalar");
  m.def(
      "set_cpu_isa", [](const std::string& want) { table() = make_table(want); return std::string(table().isa); },
      "Choose the CPU kernels ('amx', 'avx512vnni', 'avx2', 'scalar'; '' = best available); returns the one chosen");
  m.def("has_cuda", [] {
#ifdef RPTQ_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
