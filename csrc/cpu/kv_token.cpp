// The KV cache on per-token grids: each (token, head, cluster) has its own float16 scale and uint8 zero,
// stored beside the codes (rptq_cli/kernels.py: kv_token_grids, ref_kv_append_token, ref_decode_attention_token
// are the specification). Portable code for the baseline ISA: the cost of decode attention is reading the
// codes, which the compiler's vectorized loops do at the same speed for every table; no torch header (see
// kernels.h), so the float16 conversions are written out here.
#include <algorithm>
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

// rptq_layout::unpack_block, with 4-bit blocks read through a local copy: the compiler then knows the codes and
// the output do not overlap and vectorizes the nibble split (byte by byte, it took most of the attention's time).
inline void unpack_block(const uint8_t* block, int bits, uint8_t* c) {
  if (bits != 4) return rptq_layout::unpack_block(block, bits, c);
  uint8_t nibbles[16];
  std::memcpy(nibbles, block, 16);
  for (int j = 0; j < 16; ++j) c[j] = nibbles[j] & 15;
  for (int j = 0; j < 16; ++j) c[j + 16] = nibbles[j] >> 4;
}

// Float K or V rows [n, D] of one (sequence, head) from its codes and per-token grids; c: scratch of
// row_bytes(D, bits) / block_bytes(bits) · 32 codes.
void dequantize_rows(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, int64_t n, int64_t D,
                     const int32_t* groups, int64_t G, int bits, uint8_t* c, float* out) {
  const int64_t rb = row_bytes(D, bits), blocks = rb / block_bytes(bits);
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t b = 0; b < blocks; ++b)
      unpack_block(codes + s * rb + b * block_bytes(bits), bits, c + b * rptq_layout::kBlockCodes);
    float* o = out + s * D;
    int64_t i = 0;
    for (int64_t g = 0; g < G; ++g) {
      const float sc = half_value(scale[s * G + g]), z = float(zero[s * G + g]);
      for (const int64_t end = i + groups[g]; i < end; ++i) o[i] = (float(c[i]) - z) * sc;
    }
  }
}

int64_t codes_per_row(int64_t D, int bits) { return row_bytes(D, bits) / block_bytes(bits) * rptq_layout::kBlockCodes; }

// Σ a·b over n floats, in 16 partial sums: a reduction the compiler vectorizes (one accumulator is a serial chain)
float dot(const float* a, const float* b, int64_t n) {
  float part[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) part[l] += a[i + l] * b[i + l];
  float sum = 0.f;
  for (; i < n; ++i) sum += a[i] * b[i];
  for (int l = 0; l < 16; ++l) sum += part[l];
  return sum;
}

// Positions dequantized at a time by the attention: a tile of K or V (kTile × D floats) stays in the caches, and each
// tile serves every query of the kv head.
constexpr int64_t kTile = 64;

}  // namespace

void kv_token_pack(const float* x, int64_t BH, int64_t H, int64_t T, int64_t D, const int32_t* groups,
                   const float* clip, int64_t G, int bits, uint8_t* codes, int64_t codes_slab, uint16_t* scale,
                   uint8_t* zero, int64_t params_slab) {
  const int64_t rb = row_bytes(D, bits), blocks = rb / block_bytes(bits);
  const float qmax = float((1 << bits) - 1);
#pragma omp parallel if (BH * T * D > (int64_t(1) << 16))
  {
    std::vector<uint8_t> scratch(codes_per_row(D, bits));  // one row's codes, per thread
#pragma omp for schedule(static)
    for (int64_t r = 0; r < BH * T; ++r) {
      const int64_t slab = r / T, t = r % T, h = slab % H;
      const float* xr = x + r * D;
      const int32_t* gs = groups + h * G;
      const float* ratio = clip + h * G;
      uint16_t* sr = scale + slab * params_slab + t * G;
      uint8_t* zr = zero + slab * params_slab + t * G;
      uint8_t* c = scratch.data();
      std::fill(scratch.begin(), scratch.end(), uint8_t(0));
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
        rptq_layout::pack_block(c + b * rptq_layout::kBlockCodes, bits, out + b * block_bytes(bits));
    }
  }
}

void kv_token_unpack(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, int64_t BH, int64_t H, int64_t T,
                     int64_t D, const int32_t* groups, int64_t G, int bits, float* out) {
  const int64_t rb = row_bytes(D, bits);
#pragma omp parallel if (BH * T * D > (int64_t(1) << 16))
  {
    std::vector<uint8_t> c(codes_per_row(D, bits));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < BH; ++i)
      dequantize_rows(codes + i * T * rb, scale + i * T * G, zero + i * T * G, T, D, groups + (i % H) * G, G, bits,
                      c.data(), out + i * T * D);
  }
}

void kv_token_attention(const float* q, int64_t B, int64_t Hq, int64_t Tq, int64_t D, const uint8_t* kp,
                        const uint8_t* vp, int64_t Hkv, int64_t S, const uint16_t* k_scale, const uint8_t* k_zero,
                        const uint16_t* v_scale, const uint8_t* v_zero, const int32_t* k_groups, int64_t Gk,
                        const int32_t* v_groups, int64_t Gv, int bits, int64_t kv_len, float scaling, int p_bits,
                        float* out) {
  const int64_t rb = row_bytes(D, bits), rep = Hq / Hkv, nq = rep * Tq;
  const float levels = float((1 << (p_bits < 16 ? p_bits : 1)) - 1);
#pragma omp parallel if (B * Hkv * kv_len * D > (int64_t(1) << 16))
  {
    std::vector<float> tile(kTile * D), p(nq * kv_len);
    std::vector<uint8_t> c(codes_per_row(D, bits));
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * Hkv; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      // query j = (head h·rep + j / Tq, position t = j % Tq) sees the cached positions < kv_len − Tq + t + 1 (causal)
      auto query = [&](int64_t j) { return ((b * Hq + h * rep + j / Tq) * Tq + j % Tq) * D; };
      auto visible = [&](int64_t j) { return kv_len - Tq + j % Tq + 1; };
      // scores, one K tile at a time
      for (int64_t s0 = 0; s0 < kv_len; s0 += kTile) {
        const int64_t n = std::min(kTile, kv_len - s0);
        dequantize_rows(kp + (bh * S + s0) * rb, k_scale + (bh * S + s0) * Gk, k_zero + (bh * S + s0) * Gk, n, D,
                        k_groups + h * Gk, Gk, bits, c.data(), tile.data());
        for (int64_t j = 0; j < nq; ++j)
          for (int64_t s = 0; s < n; ++s) p[j * kv_len + s0 + s] = dot(q + query(j), tile.data() + s * D, D) * scaling;
      }
      for (int64_t j = 0; j < nq; ++j) {  // softmax over the visible positions, then P on its grid
        float* pj = p.data() + j * kv_len;
        const int64_t vis = visible(j);
        float mx = -INFINITY, sum = 0.f;
        for (int64_t s = 0; s < vis; ++s) mx = std::fmax(mx, pj[s]);
        for (int64_t s = 0; s < vis; ++s) sum += (pj[s] = std::exp(pj[s] - mx));
        for (int64_t s = 0; s < kv_len; ++s) {
          pj[s] = s < vis ? pj[s] / sum : 0.f;
          if (p_bits < 16) pj[s] = std::nearbyint(pj[s] * levels) / levels;
        }
        std::fill(out + query(j), out + query(j) + D, 0.f);
      }
      for (int64_t s0 = 0; s0 < kv_len; s0 += kTile) {  // P·V, one V tile at a time
        const int64_t n = std::min(kTile, kv_len - s0);
        dequantize_rows(vp + (bh * S + s0) * rb, v_scale + (bh * S + s0) * Gv, v_zero + (bh * S + s0) * Gv, n, D,
                        v_groups + h * Gv, Gv, bits, c.data(), tile.data());
        for (int64_t j = 0; j < nq; ++j) {
          float* o = out + query(j);
          for (int64_t s = 0; s < n; ++s) {
            const float ps = p[j * kv_len + s0 + s];
            const float* vr = tile.data() + s * D;
            for (int64_t i = 0; i < D; ++i) o[i] += ps * vr[i];
          }
        }
      }
    }
  }
}

}  // namespace rptq_cpu
