// The KV cache on per-token grids: each (token, head, cluster) has its own float16 scale and uint8 zero,
// stored beside the codes (rptq_cli/kernels.py: kv_token_grids, ref_kv_append_token, ref_decode_attention_token
// are the specification). Portable code for the baseline ISA: the cost of decode attention is reading the
// codes, which the compiler's vectorized loops do at the same speed for every table; no torch header (see
// kernels.h), so the float16 conversions are written out here.
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace rptq_cpu {
namespace {

// float → float16 bits, round to nearest even (what torch's .to(torch.float16) does).
uint16_t half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, mag = x & 0x7fffffffu;
  if (mag >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (mag > 0x7f800000u ? 0x200u : 0u));
  if (mag >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // ≥ 65520 rounds to infinity
  if (mag < 0x38800000u) {  // below 2^-14: a subnormal float16, exactly round(|f| · 2^24)
    float a;
    std::memcpy(&a, &mag, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a * 16777216.0f)));
  }
  const uint32_t rebased = mag - 0x38000000u;  // exponent bias 127 → 15
  return static_cast<uint16_t>(sign | ((rebased + 0xfffu + ((rebased >> 13) & 1u)) >> 13));
}

float half_value(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {
    const float v = float(man) * 5.9604644775390625e-8f;  // 2^-24
    return sign ? -v : v;
  }
  const uint32_t bits = sign | (exp == 31 ? 0x7f800000u | (man << 13) : ((exp + 112u) << 23) | (man << 13));
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Float K or V rows [n, D] of one (sequence, head) from its codes and per-token grids.
void dequantize_rows(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, int64_t n, int64_t D,
                     const int32_t* groups, int64_t G, int bits, float* out) {
  const int64_t rb = row_bytes(D, bits), blocks = rb / block_bytes(bits);
  std::vector<uint8_t> c(blocks * rptq_layout::kBlockCodes);
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t b = 0; b < blocks; ++b)
      rptq_layout::unpack_block(codes + s * rb + b * block_bytes(bits), bits, c.data() + b * rptq_layout::kBlockCodes);
    float* o = out + s * D;
    int64_t i = 0;
    for (int64_t g = 0; g < G; ++g) {
      const float sc = half_value(scale[s * G + g]), z = float(zero[s * G + g]);
      for (const int64_t end = i + groups[g]; i < end; ++i) o[i] = (float(c[i]) - z) * sc;
    }
  }
}

}  // namespace

void kv_token_pack(const float* x, int64_t BH, int64_t H, int64_t T, int64_t D, const int32_t* groups,
                   const float* clip, int64_t G, int bits, uint8_t* codes, int64_t codes_slab, uint16_t* scale,
                   uint8_t* zero, int64_t params_slab) {
  const int64_t rb = row_bytes(D, bits), blocks = rb / block_bytes(bits);
  const float qmax = float((1 << bits) - 1);
#pragma omp parallel for schedule(static) if (BH * T * D > (int64_t(1) << 16))
  for (int64_t r = 0; r < BH * T; ++r) {
    const int64_t slab = r / T, t = r % T, h = slab % H;
    const float* xr = x + r * D;
    const int32_t* gs = groups + h * G;
    const float* ratio = clip + h * G;
    uint16_t* sr = scale + slab * params_slab + t * G;
    uint8_t* zr = zero + slab * params_slab + t * G;
    std::vector<uint8_t> c(blocks * rptq_layout::kBlockCodes, 0);
    int64_t i = 0;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t end = i + gs[g];
      float lo = 0.f, hi = 0.f;
      for (int64_t j = i; j < end; ++j) {
        lo = std::fmin(lo, xr[j]);
        hi = std::fmax(hi, xr[j]);
      }
      lo *= ratio[g];
      hi *= ratio[g];
      const float kMinScale = 6.103515625e-05f;  // kernels.KV_TOKEN_MIN_SCALE = 2^-14
      sr[g] = half_bits(std::fmax((hi - lo) / qmax, kMinScale));
      const float s = half_value(sr[g]);
      const float z = std::fmin(std::fmax(std::nearbyint(-lo / s), 0.f), qmax);
      zr[g] = static_cast<uint8_t>(z);
      const float inv = 1.0f / s;
      for (; i < end; ++i) c[i] = static_cast<uint8_t>(std::fmin(std::fmax(std::nearbyint(xr[i] * inv) + z, 0.f), qmax));
    }
    uint8_t* out = codes + slab * codes_slab + t * rb;
    for (int64_t b = 0; b < blocks; ++b)
      rptq_layout::pack_block(c.data() + b * rptq_layout::kBlockCodes, bits, out + b * block_bytes(bits));
  }
}

void kv_token_unpack(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, int64_t BH, int64_t H, int64_t T,
                     int64_t D, const int32_t* groups, int64_t G, int bits, float* out) {
  const int64_t rb = row_bytes(D, bits);
#pragma omp parallel for schedule(static) if (BH * T * D > (int64_t(1) << 16))
  for (int64_t i = 0; i < BH; ++i)
    dequantize_rows(codes + i * T * rb, scale + i * T * G, zero + i * T * G, T, D, groups + (i % H) * G, G, bits,
                    out + i * T * D);
}

void kv_token_attention(const float* q, int64_t B, int64_t Hq, int64_t Tq, int64_t D, const uint8_t* kp,
                        const uint8_t* vp, int64_t Hkv, int64_t S, const uint16_t* k_scale, const uint8_t* k_zero,
                        const uint16_t* v_scale, const uint8_t* v_zero, const int32_t* k_groups, int64_t Gk,
                        const int32_t* v_groups, int64_t Gv, int bits, int64_t kv_len, float scaling, int p_bits,
                        float* out) {
  const int64_t rb = row_bytes(D, bits), rep = Hq / Hkv;
  const float levels = float((1 << (p_bits < 16 ? p_bits : 1)) - 1);
#pragma omp parallel for schedule(static) if (B * Hkv * kv_len * D > (int64_t(1) << 16))
  for (int64_t bh = 0; bh < B * Hkv; ++bh) {
    const int64_t b = bh / Hkv, h = bh % Hkv;
    std::vector<float> k(kv_len * D), v(kv_len * D), p(kv_len);
    dequantize_rows(kp + bh * S * rb, k_scale + bh * S * Gk, k_zero + bh * S * Gk, kv_len, D, k_groups + h * Gk, Gk,
                    bits, k.data());
    dequantize_rows(vp + bh * S * rb, v_scale + bh * S * Gv, v_zero + bh * S * Gv, kv_len, D, v_groups + h * Gv, Gv,
                    bits, v.data());
    for (int64_t j = 0; j < rep * Tq; ++j) {
      const int64_t head = h * rep + j / Tq, t = j % Tq;
      const float* qr = q + ((b * Hq + head) * Tq + t) * D;
      float* o = out + ((b * Hq + head) * Tq + t) * D;
      const int64_t visible = kv_len - Tq + t + 1;  // causal: query t sits at position kv_len − Tq + t
      float mx = -INFINITY;
      for (int64_t s = 0; s < visible; ++s) {
        float dot = 0.f;
        for (int64_t i = 0; i < D; ++i) dot += qr[i] * k[s * D + i];
        p[s] = dot * scaling;
        mx = std::fmax(mx, p[s]);
      }
      float sum = 0.f;
      for (int64_t s = 0; s < visible; ++s) sum += (p[s] = std::exp(p[s] - mx));
      for (int64_t s = 0; s < visible; ++s) {
        p[s] /= sum;
        if (p_bits < 16) p[s] = std::nearbyint(p[s] * levels) / levels;
      }
      for (int64_t i = 0; i < D; ++i) o[i] = 0.f;
      for (int64_t s = 0; s < visible; ++s)
        for (int64_t i = 0; i < D; ++i) o[i] += p[s] * v[s * D + i];
    }
  }
}

}  // namespace rptq_cpu
