// CPU implementations of the rptq:: ops (schemas are defined in rptq_cli/kernels.py, before this
// extension is imported; here we only register kernels with TORCH_LIBRARY_IMPL). Each wrapper first calls
// its op's check in checks.h (the same checks the CUDA wrappers call; a ValueError naming the op and the
// argument), then converts activations to float32 and calls the kernel table chosen at run time from the
// CPU flags (cpu/kernels.h).
//
// CUDA kernels (csrc/cuda/*.cu) register themselves the same way with TORCH_LIBRARY_IMPL(rptq, CUDA, m).
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "checks.h"
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

// ---- argument preparation (after the shared checks of checks.h) ----------------------------------------
Tensor f32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }
Tensor i32(const Tensor& t) { return t.to(at::kInt).contiguous(); }

struct Weight {
  Tensor qw, scales, zeros, gs;
  int64_t N, K, G;
};

Weight prepare_weight(const Tensor& x, const Tensor& qw, const Tensor& scales, const Tensor& zeros, const Tensor& gs) {
  return {qw.contiguous(), f32(scales), zeros.contiguous(), i32(gs), scales.size(0), x.size(-1), scales.size(1)};
}

Tensor prepare_bias(const std::optional<Tensor>& bias) { return bias.has_value() ? f32(*bias) : Tensor(); }

std::vector<int64_t> out_shape(const Tensor& x, int64_t last) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = last;
  return s;
}

// ---- ops ----------------------------------------------------------------------------------------------
Tensor pack_weight(const Tensor& codes, int64_t bits) {
  rptq_checks::check_pack_weight("pack_weight", codes, bits);
  Tensor c = codes.contiguous();
  const int64_t N = c.size(0), K = c.size(1);
  Tensor out = at::empty({N, row_bytes(K, bits)}, c.options());
  table().pack_rows(c.data_ptr<uint8_t>(), N, K, int(bits), out.data_ptr<uint8_t>());
  return out;
}

Tensor unpack_weight(const Tensor& packed, int64_t bits, int64_t N, int64_t K) {
  rptq_checks::check_unpack_weight("unpack_weight", packed, bits, N, K);
  Tensor p = packed.contiguous();
  Tensor out = at::empty({N, K}, p.options());
  table().unpack_rows(p.data_ptr<uint8_t>(), N, K, int(bits), out.data_ptr<uint8_t>());
  return out;
}

// The prefill path's float32 weight slab (≤ kSlabBytes), kept between calls by each calling thread: a fresh
// 32 MiB allocation took ~8 ms of page faults per call on the development machine, more than dequantizing
// into it.
constexpr int64_t kSlabBytes = int64_t(32) << 20;
// The slab holds at least this many weight rows, however long they are (one sgemm per slab).
constexpr int64_t kSlabMinRows = 64;
// linear_a16 runs the GEMV kernels, in blocks of kGemvMaxRows rows, up to this many rows (a short prompt). Measured
// with the AVX-512 integer GEMV, 2 threads: a 4096² layer 16 rows 4.0 ms, 32 rows 8.1 ms, 33 rows (dequantize +
// sgemm) 15 ms; a 1536×576 layer 32 rows 1.65 ms against 0.89 ms for 33: small layers would switch earlier.
constexpr int64_t kGemvBatchMaxRows = 32;

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
  if (M <= kGemvBatchMaxRows || w.K == 0) {
    // Blocks of ≤ kGemvMaxRows rows through the GEMV: each block streams the packed weight once, cheaper than
    // dequantizing it to float32 (8× its bytes, written then read) for a short prompt.
    Tensor y = at::empty({M, w.N}, x2.options());
    for (int64_t m0 = 0; m0 < M; m0 += rptq_cpu::kGemvMaxRows) {
      const int64_t rows = std::min(rptq_cpu::kGemvMaxRows, M - m0);
      table().linear_a16(x2.data_ptr<float>() + m0 * w.K, rows, w.qw.data_ptr<uint8_t>(), w.scales.data_ptr<float>(),
                         w.zeros.data_ptr<uint8_t>(), w.gs.data_ptr<int32_t>(), int(w.G), w.N, w.K, int(bits),
                         b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>() + m0 * w.N);
    }
    return y;
  }
  // Prefill: dequantize slabs of rows (bounded memory) and multiply with torch's sgemm, each slab straight
  // into its columns of y.
  Tensor y = at::empty({M, w.N}, x2.options());
  const int64_t row_floats = std::max<int64_t>(1, w.K * int64_t(sizeof(float)));
  const int64_t slab = std::min(w.N, std::max<int64_t>(kSlabMinRows, kSlabBytes / row_floats));
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
  rptq_checks::check_linear_a16(x, qweight, scales, zeros, group_sizes, bits, bias);
  Weight w = prepare_weight(x, qweight, scales, zeros, group_sizes);
  Tensor y = run_linear_a16(f32(x).reshape({-1, w.K}), w, prepare_bias(bias), bits);
  return y.to(x.scalar_type()).reshape(out_shape(x, w.N));
}

Tensor linear_aq(const Tensor& x, const Tensor& qweight, const Tensor& scales, const Tensor& zeros,
                 const Tensor& group_sizes, int64_t bits, const Tensor& act_scale, const Tensor& act_zero,
                 int64_t act_bits, const std::optional<Tensor>& bias) {
  rptq_checks::check_linear_aq(x, qweight, scales, zeros, group_sizes, bits, act_scale, act_zero, act_bits, bias);
  Weight w = prepare_weight(x, qweight, scales, zeros, group_sizes);
  Tensor b = prepare_bias(bias), a_scale = f32(act_scale), a_zero = i32(act_zero);
  Tensor x2 = f32(x).reshape({-1, w.K});
  const int64_t M = x2.size(0);
  // The integer kernels: the GEMV for decode rows, the GEMM for more rows of weights ≤ kIntGemmMaxBits bits (codes
  // a valid s8 operand).
  const bool decode = M >= 1 && M <= rptq_cpu::kGemvMaxRows;
  const auto integer = decode ? table().gemv_aq : bits <= rptq_cpu::kIntGemmMaxBits ? table().linear_aq : nullptr;
  if (integer == nullptr || w.K == 0) {
    // No integer kernel on this ISA (or 8-bit weights in a GEMM): the same math as fake_quant(x) then the W·A16
    // kernels.
    Tensor fq = at::empty_like(x2);
    table().fake_quant_act(x2.data_ptr<float>(), M, w.K, a_scale.data_ptr<float>(), a_zero.data_ptr<int32_t>(),
                           w.gs.data_ptr<int32_t>(), int(w.G), int(act_bits), fq.data_ptr<float>());
    return run_linear_a16(fq, w, b, bits).to(x.scalar_type()).reshape(out_shape(x, w.N));
  }
  Tensor y = at::empty({M, w.N}, x2.options());
  integer(x2.data_ptr<float>(), M, w.qw.data_ptr<uint8_t>(), w.scales.data_ptr<float>(), w.zeros.data_ptr<uint8_t>(),
          w.gs.data_ptr<int32_t>(), int(w.G), w.N, w.K, int(bits), a_scale.data_ptr<float>(),
          a_zero.data_ptr<int32_t>(), int(act_bits), b.defined() ? b.data_ptr<float>() : nullptr,
          y.data_ptr<float>());
  return y.to(x.scalar_type()).reshape(out_shape(x, w.N));
}

Tensor fake_quant_act(const Tensor& x, const Tensor& act_scale, const Tensor& act_zero, const Tensor& gs,
                      int64_t bits) {
  rptq_checks::check_fake_quant_act(x, act_scale, act_zero, gs, bits);
  const int64_t C = x.size(-1);
  Tensor a_scale = f32(act_scale), a_zero = i32(act_zero), g = i32(gs);
  Tensor x2 = f32(x).reshape({-1, C});
  Tensor out = at::empty_like(x2);
  table().fake_quant_act(x2.data_ptr<float>(), x2.size(0), C, a_scale.data_ptr<float>(), a_zero.data_ptr<int32_t>(),
                         g.data_ptr<int32_t>(), int(g.numel()), int(bits), out.data_ptr<float>());
  return out.to(x.scalar_type()).reshape(x.sizes());
}

Tensor fake_quant_act_token(const Tensor& x, const Tensor& gs, const Tensor& clip, int64_t bits) {
  rptq_checks::check_fake_quant_act_token(x, gs, clip, bits);
  const int64_t C = x.size(-1);
  Tensor g = i32(gs), r = f32(clip);
  Tensor x2 = f32(x).reshape({-1, C});
  Tensor out = at::empty_like(x2);
  table().quantize_act_token(x2.data_ptr<float>(), x2.size(0), C, g.data_ptr<int32_t>(), r.data_ptr<float>(),
                             int(g.numel()), int(bits), out.data_ptr<float>());
  return out.to(x.scalar_type()).reshape(x.sizes());
}

Tensor reorder_norm(const Tensor& x, const Tensor& perm, const Tensor& weight, const std::optional<Tensor>& bias,
                    double eps, bool rms) {
  rptq_checks::check_reorder_norm(x, perm, weight, bias);
  const int64_t C = x.size(-1);
  Tensor p = perm.to(at::kLong).contiguous(), w = f32(weight), b = prepare_bias(bias);
  Tensor x2 = f32(x).reshape({-1, C});
  Tensor y = at::empty_like(x2);
  table().reorder_norm(x2.data_ptr<float>(), x2.size(0), C, p.data_ptr<int64_t>(), w.data_ptr<float>(),
                       b.defined() ? b.data_ptr<float>() : nullptr, float(eps), rms ? 1 : 0, y.data_ptr<float>());
  return y.to(x.scalar_type()).reshape(x.sizes());
}

void kv_write(const Tensor& x, const Tensor& scale, const Tensor& zero, int64_t bits, uint8_t* out, int64_t out_slab) {
  Tensor xf = f32(x), s = f32(scale), z = i32(zero);
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  table().kv_pack(xf.data_ptr<float>(), B * H, H, T, D, s.data_ptr<float>(), z.data_ptr<int32_t>(), int(bits), out,
                  out_slab);
}

Tensor kv_pack(const Tensor& x, const Tensor& scale, const Tensor& zero, int64_t bits) {
  rptq_checks::check_kv_pack(x, scale, zero, bits);
  const int64_t rb = row_bytes(x.size(3), bits);
  Tensor out = at::empty({x.size(0), x.size(1), x.size(2), rb}, x.options().dtype(at::kByte));
  kv_write(x, scale, zero, bits, out.data_ptr<uint8_t>(), x.size(2) * rb);
  return out;
}

void kv_append(const Tensor& cache, const Tensor& x, const Tensor& scale, const Tensor& zero, int64_t bits,
               int64_t pos) {
  rptq_checks::check_kv_append(cache, x, scale, zero, bits, pos);
  const int64_t rb = row_bytes(x.size(3), bits);
  kv_write(x, scale, zero, bits, cache.data_ptr<uint8_t>() + pos * rb, cache.size(2) * rb);
}

Tensor kv_unpack(const Tensor& packed, const Tensor& scale, const Tensor& zero, int64_t bits, int64_t D) {
  rptq_checks::check_kv_unpack(packed, scale, zero, bits, D);
  Tensor p = packed.contiguous(), s = f32(scale), z = i32(zero);
  Tensor out = at::empty({p.size(0), p.size(1), p.size(2), D}, p.options().dtype(at::kFloat));
  table().kv_unpack(p.data_ptr<uint8_t>(), p.size(0) * p.size(1), p.size(1), p.size(2), D, s.data_ptr<float>(),
                    z.data_ptr<int32_t>(), int(bits), out.data_ptr<float>());
  return out;
}

Tensor decode_attention(const Tensor& q, const Tensor& k_packed, const Tensor& v_packed, const Tensor& k_scale,
                        const Tensor& k_zero, const Tensor& v_scale, const Tensor& v_zero, int64_t bits,
                        int64_t kv_len, double scaling, int64_t p_bits) {
  rptq_checks::check_decode_attention(q, k_packed, v_packed, k_scale, k_zero, v_scale, v_zero, bits, kv_len, p_bits);
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_packed.size(1), S = k_packed.size(2);
  Tensor qf = f32(q), kp = k_packed.contiguous(), vp = v_packed.contiguous();
  Tensor ks = f32(k_scale), kz = i32(k_zero), vs = f32(v_scale), vz = i32(v_zero);
  Tensor out = at::empty_like(qf);
  table().decode_attention(qf.data_ptr<float>(), B, Hq, Tq, D, kp.data_ptr<uint8_t>(), vp.data_ptr<uint8_t>(), Hkv, S,
                           ks.data_ptr<float>(), kz.data_ptr<int32_t>(), vs.data_ptr<float>(), vz.data_ptr<int32_t>(),
                           int(bits), kv_len, float(scaling), int(p_bits), out.data_ptr<float>());
  return out.to(q.scalar_type());
}

// ---- the KV cache on per-token grids (kernels in cpu/kv_token.inc)

uint16_t* half_bits(const Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::Half>()); }

void kv_append_token(const Tensor& cache, const Tensor& scale, const Tensor& zero, const Tensor& x,
                     const Tensor& group_sizes, const Tensor& clip, int64_t bits, int64_t pos) {
  rptq_checks::check_kv_append_token(cache, scale, zero, x, group_sizes, clip, bits, pos);
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), S = cache.size(2);
  const int64_t G = group_sizes.size(1), rb = row_bytes(D, bits);
  Tensor xf = f32(x), g = i32(group_sizes), r = f32(clip);
  table().kv_token_pack(xf.data_ptr<float>(), B * H, H, T, D, g.data_ptr<int32_t>(), r.data_ptr<float>(), G,
                        int(bits), cache.data_ptr<uint8_t>() + pos * rb, S * rb, half_bits(scale) + pos * G,
                        zero.data_ptr<uint8_t>() + pos * G, S * G);
}

Tensor kv_unpack_token(const Tensor& packed, const Tensor& scale, const Tensor& zero, const Tensor& group_sizes,
                       int64_t bits, int64_t D) {
  rptq_checks::check_kv_unpack_token(packed, scale, zero, group_sizes, bits, D);
  Tensor p = packed.contiguous(), s = scale.contiguous(), z = zero.contiguous(), g = i32(group_sizes);
  Tensor out = at::empty({p.size(0), p.size(1), p.size(2), D}, p.options().dtype(at::kFloat));
  table().kv_token_unpack(p.data_ptr<uint8_t>(), half_bits(s), z.data_ptr<uint8_t>(), p.size(0) * p.size(1),
                          p.size(1), p.size(2), D, g.data_ptr<int32_t>(), g.size(1), int(bits), out.data_ptr<float>());
  return out;
}

Tensor decode_attention_token(const Tensor& q, const Tensor& k_packed, const Tensor& v_packed, const Tensor& k_scale,
                              const Tensor& k_zero, const Tensor& v_scale, const Tensor& v_zero,
                              const Tensor& k_group_sizes, const Tensor& v_group_sizes, int64_t bits, int64_t kv_len,
                              double scaling, int64_t p_bits) {
  rptq_checks::check_decode_attention_token(q, k_packed, v_packed, k_scale, k_zero, v_scale, v_zero, k_group_sizes,
                                            v_group_sizes, bits, kv_len, p_bits);
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_packed.size(1), S = k_packed.size(2);
  Tensor qf = f32(q), kp = k_packed.contiguous(), vp = v_packed.contiguous();
  Tensor ks = k_scale.contiguous(), kz = k_zero.contiguous(), vs = v_scale.contiguous(), vz = v_zero.contiguous();
  Tensor kg = i32(k_group_sizes), vg = i32(v_group_sizes);
  Tensor out = at::empty_like(qf);
  table().kv_token_attention(qf.data_ptr<float>(), B, Hq, Tq, D, kp.data_ptr<uint8_t>(), vp.data_ptr<uint8_t>(), Hkv,
                             S, half_bits(ks), kz.data_ptr<uint8_t>(), half_bits(vs), vz.data_ptr<uint8_t>(),
                             kg.data_ptr<int32_t>(), kg.size(1), vg.data_ptr<int32_t>(), vg.size(1), int(bits),
                             kv_len, float(scaling), int(p_bits), out.data_ptr<float>());
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(rptq, CPU, m) {
  m.impl("pack_weight", &pack_weight);
  m.impl("unpack_weight", &unpack_weight);
  m.impl("linear_a16", &linear_a16);
  m.impl("linear_aq", &linear_aq);
  m.impl("fake_quant_act", &fake_quant_act);
  m.impl("fake_quant_act_token", &fake_quant_act_token);
  m.impl("reorder_norm", &reorder_norm);
  m.impl("kv_pack", &kv_pack);
  m.impl("kv_unpack", &kv_unpack);
  m.impl("kv_append", &kv_append);
  m.impl("decode_attention", &decode_attention);
  m.impl("kv_append_token", &kv_append_token);
  m.impl("kv_unpack_token", &kv_unpack_token);
  m.impl("decode_attention_token", &decode_attention_token);
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
