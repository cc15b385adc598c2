// AVX-512 (F/BW/VL + VNNI) kernels. The portable kernels are compiled for this ISA too; the hot ops
// are replaced below with intrinsics.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi2")
#define RPTQ_NS avx512
#include "generic.inc"
#pragma GCC pop_options

// ==== hand-written AVX-512 kernels =====================================================================
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi2")

namespace rptq_cpu {
namespace avx512 {
namespace {

// 16 codes (lanes) of chunk c (= codes 16c..16c+15 of a row) as int32, from the block_q{BITS} layout.
template <int BITS>
inline __m512i unpack16(const uint8_t* row, int64_t c) {
  if constexpr (BITS == 8) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * 16)));
  } else if constexpr (BITS == 4) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + (c >> 1) * 16)));
    if (c & 1) v = _mm512_srli_epi32(v, 4);
    return _mm512_and_si512(v, _mm512_set1_epi32(15));
  } else {
    const uint8_t* blk = row + (c >> 1) * block_bytes(BITS);
    uint64_t lo;
    std::memcpy(&lo, blk, 8);
    const int h = int(c & 1);
    // lane i: byte i % 8, shift 2 * (i / 8) (+ 4 for the second half)
    const __m512i sh = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512i v = _mm512_cvtepu8_epi32(_mm_set1_epi64x(int64_t(lo)));
    v = _mm512_srlv_epi32(v, _mm512_add_epi32(sh, _mm512_set1_epi32(4 * h)));
    v = _mm512_and_si512(v, _mm512_set1_epi32(3));
    if constexpr (BITS == 3) {
      uint32_t hi;
      std::memcpy(&hi, blk + 8, 4);
      const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
      __m512i hb = _mm512_srlv_epi32(_mm512_set1_epi32(int32_t(hi)), _mm512_add_epi32(lane, _mm512_set1_epi32(16 * h)));
      hb = _mm512_slli_epi32(_mm512_and_si512(hb, _mm512_set1_epi32(1)), 2);
      v = _mm512_or_si512(v, hb);
    }
    return v;
  }
}

template <int BITS>
inline __m512 unpack16_ps(const uint8_t* row, int64_t c) {
  return _mm512_cvtepi32_ps(unpack16<BITS>(row, c));
}

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// software prefetch distance of the weight stream, in rows
constexpr int64_t kPrefetchRows = 2;
constexpr int64_t kSpreadRows = 4;

// Codes of x[0..len) on one grid (bit-exact with quantize_one: x·inv, round half to even, + zero,
// clamp) into out; returns Σ codes.
inline int32_t quantize_span(const float* x, int64_t len, float inv, int32_t zero, int qmax, uint8_t* out) {
  const __m512 iv = _mm512_set1_ps(inv), zv = _mm512_set1_ps(float(zero)), hi = _mm512_set1_ps(float(qmax));
  const __m512 lo = _mm512_setzero_ps();
  __m512i sum = _mm512_setzero_si512();
  for (int64_t k = 0; k < len; k += 16) {
    const __mmask16 mk = len - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - k)) - 1u);
    __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + k), iv),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, zv), lo), hi);
    const __m512i q = _mm512_maskz_cvtps_epi32(mk, v);
    _mm_mask_storeu_epi8(out + k, mk, _mm512_cvtepi32_epi8(q));
    sum = _mm512_add_epi32(sum, q);
  }
  return _mm512_reduce_add_epi32(sum);
}

// Stage the activations of every segment, group-masked and segment-major (xs[s][m][width], width 16 or 32, the
// upper 16 lanes of a 32-wide chunk times hi_scale), and their per-group sums xsum[m][G] (unscaled).
inline void stage_segments(const float* x, int64_t M, int64_t K, const Segments& sg, int G, int width,
                           float hi_scale, float* xs, float* xsum) {
  const __m512 hs = _mm512_set1_ps(hi_scale);
  for (int g = 0; g < G; ++g) {
    for (int64_t m = 0; m < M; ++m) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t s = sg.first[g]; s < sg.first[g + 1]; ++s) {
        const int64_t c = sg.chunk[s];
        const int64_t valid = imin(width, K - c * width);  // lanes that exist in x
        const uint64_t mk = sg.mask[s] & ((uint64_t(1) << valid) - 1u);
        for (int h = 0; h < width / 16; ++h) {
          const __m512 v = _mm512_maskz_loadu_ps(__mmask16(mk >> (16 * h)), x + m * K + c * width + 16 * h);
          _mm512_store_ps(xs + (s * M + m) * width + 16 * h, h ? _mm512_mul_ps(v, hs) : v);
          acc = _mm512_add_ps(acc, v);
        }
      }
      xsum[m * G + g] = hsum(acc);
    }
  }
}

// ---- W{2,3,4,8}A16 GEMV (M ≤ 8 rows) ---------------------------------------------------------------
// y[m, n] = Σ_g scale[n,g] · (Σ_{k∈g} code[n,k] x[m,k] − zero[n,g] Σ_{k∈g} x[m,k]): the codes are
// converted to float in registers and multiplied with the group-masked activations; the zero-point
// enters once per group through the activation sums.
// One output row n of a GEMV over M activation rows:
//   y[m, n] = Σ_g scale_g · (dot_g[m] − zero_g · xsum[m, g]) + bias[n],
// where group_dot(g, acc) leaves dot_g[m] = Σ_{k∈g} code_k · x[m, k] in the lanes of acc[m].
template <int M, typename GroupDot>
inline void gemv_row(int64_t n, const float* scales, const uint8_t* zeros, int G, const float* xsum,
                     const float* bias, int64_t N, float* y, GroupDot&& group_dot) {
  const float* sc = scales + n * G;
  const uint8_t* zr = zeros + n * G;
  __m512 tot[M];
  float corr[M];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    tot[m] = _mm512_setzero_ps();
    corr[m] = 0.f;
  }
  for (int g = 0; g < G; ++g) {
    __m512 acc[M];
    group_dot(g, acc);
    const __m512 sv = _mm512_set1_ps(sc[g]);
    const float z = float(zr[g]);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      tot[m] = _mm512_fmadd_ps(acc[m], sv, tot[m]);
      corr[m] += sc[g] * z * xsum[m * G + g];
    }
  }
  const float b = bias ? bias[n] : 0.f;
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) y[m * N + n] = hsum(tot[m]) - corr[m] + b;
}

template <int M, int BITS>
void gemv_rows(const float* xs, const Segments& sg, const float* xsum, const uint8_t* qw, int64_t rb,
               const float* scales, const uint8_t* zeros, int G, int64_t n0, int64_t n1, int64_t N,
               const float* bias, float* y) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = qw + n * rb;
    if (n + kPrefetchRows < n1)
      for (int64_t i = 0; i < rb; i += 64) _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * rb + i), _MM_HINT_T0);
    gemv_row<M>(n, scales, zeros, G, xsum, bias, N, y, [&](int g, __m512 (&acc)[M]) {
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
      for (int64_t s = sg.first[g]; s < sg.first[g + 1]; ++s) {
        const __m512 w = unpack16_ps<BITS>(row, sg.chunk[s]);
        const float* xv = xs + s * 16 * M;
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(w, _mm512_load_ps(xv + 16 * m), acc[m]);
      }
    });
  }
}

template <int BITS>
void gemv(int64_t M, const float* xs, const Segments& sg, const float* xsum, const uint8_t* qw, int64_t rb,
          const float* scales, const uint8_t* zeros, int G, int64_t N, const float* bias, float* y) {
  with_rows(M, [&](auto rows) {
    parallel_rows(N, rb, [&](int64_t n0, int64_t n1) {
      gemv_rows<decltype(rows)::value, BITS>(xs, sg, xsum, qw, rb, scales, zeros, G, n0, n1, N, bias, y);
    });
  });
}

template <int BITS>
struct BlockDecoder {
  // 3-bit: lane i of half h takes low bits (byte i % 8) >> (2·(i / 8) + 4h), high bit (u32 >> (i + 16h)) & 1
  __m512i lo_mask, hi_mask, sh_lo, sh_hi, lane, lane16, three, one;
  BlockDecoder() {  // an explicit constructor, so that it is compiled for this file's target
    lo_mask = _mm512_set1_epi32(0x0F);
    hi_mask = _mm512_set1_epi32(0xF0);
    sh_lo = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    sh_hi = _mm512_add_epi32(sh_lo, _mm512_set1_epi32(4));
    lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    lane16 = _mm512_add_epi32(lane, _mm512_set1_epi32(16));
    three = _mm512_set1_epi32(3);
    one = _mm512_set1_epi32(1);
  }

  // codes 0..15 → wl, codes 16..31 → wh (4-bit: ·16) of block c of the row
  inline void operator()(const uint8_t* row, int64_t c, __m512& wl, __m512& wh) const {
    if constexpr (BITS == 4) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * 16)));
      wl = _mm512_cvtepi32_ps(_mm512_and_si512(v, lo_mask));
      wh = _mm512_cvtepi32_ps(_mm512_and_si512(v, hi_mask));
    } else {  // 3
      const uint8_t* blk = row + c * 12;
      uint64_t lo8;
      uint32_t hi;
      std::memcpy(&lo8, blk, 8);
      std::memcpy(&hi, blk + 8, 4);
      const __m512i v = _mm512_cvtepu8_epi32(_mm_set1_epi64x(int64_t(lo8)));
      const __m512i h = _mm512_set1_epi32(int32_t(hi));
      const __m512i c0 = _mm512_or_si512(_mm512_and_si512(_mm512_srlv_epi32(v, sh_lo), three),
                                         _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(h, lane), one), 2));
      const __m512i c1 = _mm512_or_si512(_mm512_and_si512(_mm512_srlv_epi32(v, sh_hi), three),
                                         _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(h, lane16), one), 2));
      wl = _mm512_cvtepi32_ps(c0);
      wh = _mm512_cvtepi32_ps(c1);
    }
  }
};

// Block path (3- and 4-bit): one load per 32 codes; for 4-bit the high nibbles are used in place
// (code·16, no shift) against activations pre-divided by 16 — exact, a power of two. Separate
// accumulators for the two halves (and, for ≤ 2 rows, two blocks per step) keep FMA latency hidden.
template <int M, int BITS>
void gemvb_rows(const float* xs, const Segments& sg, const float* xsum, const uint8_t* qw, int64_t rb,
                const float* scales, const uint8_t* zeros, int G, int64_t n0, int64_t n1, int64_t N,
                const float* bias, float* y) {
  const BlockDecoder<BITS> dec;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = qw + n * rb;
    // software prefetch spread over the row (one block of row n + kSpreadRows per block: a burst of a
    // whole row's lines at once fills the line-fill buffers and stalls the arithmetic)
    const uint8_t* pf = row + (n + kSpreadRows < n1 ? kSpreadRows * rb : 0);
    gemv_row<M>(n, scales, zeros, G, xsum, bias, N, y, [&](int g, __m512 (&acc)[M]) {
      __m512 al[M], ah[M];
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) al[m] = ah[m] = _mm512_setzero_ps();
      int64_t s = sg.first[g];
      const int64_t s1 = sg.first[g + 1];
      if constexpr (M <= 2) {
        __m512 bl[M], bh[M];
#pragma GCC unroll 2
        for (int m = 0; m < M; ++m) bl[m] = bh[m] = _mm512_setzero_ps();
        for (; s + 2 <= s1; s += 2) {
          __m512 wl0, wh0, wl1, wh1;
          _mm_prefetch(reinterpret_cast<const char*>(pf + sg.chunk[s] * block_bytes(BITS)), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(pf + sg.chunk[s + 1] * block_bytes(BITS)), _MM_HINT_T0);
          dec(row, sg.chunk[s], wl0, wh0);
          dec(row, sg.chunk[s + 1], wl1, wh1);
          const float* xv = xs + s * 32 * M;
#pragma GCC unroll 2
          for (int m = 0; m < M; ++m) {
            al[m] = _mm512_fmadd_ps(wl0, _mm512_load_ps(xv + 32 * m), al[m]);
            ah[m] = _mm512_fmadd_ps(wh0, _mm512_load_ps(xv + 32 * m + 16), ah[m]);
            bl[m] = _mm512_fmadd_ps(wl1, _mm512_load_ps(xv + 32 * (M + m)), bl[m]);
            bh[m] = _mm512_fmadd_ps(wh1, _mm512_load_ps(xv + 32 * (M + m) + 16), bh[m]);
          }
        }
#pragma GCC unroll 2
        for (int m = 0; m < M; ++m) {
          al[m] = _mm512_add_ps(al[m], bl[m]);
          ah[m] = _mm512_add_ps(ah[m], bh[m]);
        }
      }
      for (; s < s1; ++s) {
        __m512 wl, wh;
        _mm_prefetch(reinterpret_cast<const char*>(pf + sg.chunk[s] * block_bytes(BITS)), _MM_HINT_T0);
        dec(row, sg.chunk[s], wl, wh);
        const float* xv = xs + s * 32 * M;
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          al[m] = _mm512_fmadd_ps(wl, _mm512_load_ps(xv + 32 * m), al[m]);
          ah[m] = _mm512_fmadd_ps(wh, _mm512_load_ps(xv + 32 * m + 16), ah[m]);
        }
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[m] = _mm512_add_ps(al[m], ah[m]);
    });
  }
}

template <int BITS>
void v_gemvb(const float* x, int64_t M, const uint8_t* qw, const float* scales, const uint8_t* zeros,
             const int32_t* gs, int G, int64_t N, int64_t K, const float* bias, float* y) {
  Segments sg;
  sg.build(gs, G, 32);
  Buf<float> xs(sg.n * 32 * M);  // [seg][m][32]: lanes 0..15 = x, 16..31 = x (/ 16 for 4-bit); 0 outside the group
  Buf<float> xsum(M * G);
  stage_segments(x, M, K, sg, G, 32, BITS == 4 ? 1.0f / 16 : 1.0f, xs.p, xsum.p);
  const int64_t rb = row_bytes(K, BITS);
  with_rows(M, [&](auto rows) {
    parallel_rows(N, rb, [&](int64_t n0, int64_t n1) {
      gemvb_rows<decltype(rows)::value, BITS>(xs.p, sg, xsum.p, qw, rb, scales, zeros, G, n0, n1, N, bias, y);
    });
  });
}

// ---- W{2,3,4,8} GEMV on int16 activations (≤ kGemvMaxRows rows): the codes never become floats ------------
// The activations are rounded once per call to int16, on one grid per (row m, group g): either symmetric,
// q = round(x / s) with s = max|x_g| / 32767 (linear_a16), or exactly the codes of linear_aq's static grid,
// q = code − act_zero with s = act_scale. A 64-code chunk of a row (two blocks) widens to two vectors of 32
// words, lo = the codes at chunk positions 0..15, 32..47 and hi = those at 16..31, 48..63 (Q16Decode: for
// 4-bit the low and high nibbles of the 32 bytes, for 2/3-bit one byte permute and variable shifts); the
// activations are staged in that order, and two vpdpwssd give exact int32 partial sums, converted and scaled
// once per chunk:
//   y[m, n] = Σ_g scale[n,g]·s[m,g]·(Σ_{k∈g} c_k·q_k − zero[n,g]·Σ_{k∈g} q_k) + bias[n].
// A chunk that straddles groups is visited once per group with the activations outside the group zeroed
// (Segments of 64 codes), in one flat loop over the visits, no branch per group (per-group loops mispredicted
// on RPTQ's small clusters). Numerics: exactly the float reference applied to x̂ = s·q, |x − x̂| ≤ s/2 ≤
// max|x_g|·2^-16 for linear_a16 (bf16 rounds at 2^-9), and linear_aq's own quantization for linear_aq.

// The activations of one call for M rows over groups gs, staged for q16_rows.
struct Q16Acts {
  Segments sg;           // visits: 64-code chunks × groups (built first: every buffer below is sized by it)
  Buf<int32_t> group;    // [visits] the group of each visit
  Buf<uint64_t> bytes;   // [visits] mask of the chunk's weight bytes that exist (a row's last chunk may be one block)
  Buf<int16_t> xq;       // [visits][M][2][32]: the lo words, then the hi words (Q16Decode)
  Buf<float> step;       // [M][G] grid step s
  Buf<float> qsum;       // [M][G] s·Σ q (the zero-point term)
  Q16Acts(const int32_t* gs, int G, int64_t M)
      : group((sg.build(gs, G, kQ16Chunk), sg.n)), bytes(sg.n), xq(sg.n * M * kQ16Chunk), step(M * G), qsum(M * G) {
    for (int g = 0; g < G; ++g)
      for (int64_t v = sg.first[g]; v < sg.first[g + 1]; ++v) group[v] = g;
  }
};

// Stage M rows of int16 activations q [M][Kp] (Kp = K rounded up to kQ16Chunk, zero past K) into visits over
// rows of rb bytes, bits-bit codes.
inline void q16_stage(const int16_t* q, int64_t M, int64_t Kp, int64_t rb, int bits, Q16Acts& a) {
  const Segments& sg = a.sg;
  for (int64_t v = 0; v < sg.n; ++v) {
    const int64_t c = sg.chunk[v];
    const uint64_t mk = sg.mask[v];
    const __mmask32 lo = __mmask32((mk & 0xFFFF) | ((mk >> 32) & 0xFFFF) << 16);
    const __mmask32 hi = __mmask32(((mk >> 16) & 0xFFFF) | ((mk >> 48) & 0xFFFF) << 16);
    for (int64_t m = 0; m < M; ++m) {
      const int16_t* src = q + m * Kp + c * kQ16Chunk;
      const __m512i p0 = _mm512_loadu_si512(src), p1 = _mm512_loadu_si512(src + 32);  // positions 0..31, 32..63
      int16_t* dst = a.xq.p + (v * M + m) * kQ16Chunk;
      if (bits == 8) {  // lo = positions 0..31, hi = 32..63
        _mm512_store_si512(dst, _mm512_maskz_mov_epi16(__mmask32(mk), p0));
        _mm512_store_si512(dst + 32, _mm512_maskz_mov_epi16(__mmask32(mk >> 32), p1));
      } else {
        _mm512_store_si512(dst, _mm512_maskz_mov_epi16(lo, _mm512_shuffle_i64x2(p0, p1, 0x44)));       // 0..15, 32..47
        _mm512_store_si512(dst + 32, _mm512_maskz_mov_epi16(hi, _mm512_shuffle_i64x2(p0, p1, 0xEE)));  // 16..31, 48..63
      }
    }
    const int64_t chunk_bytes = 2 * block_bytes(bits), left = imin(rb - c * chunk_bytes, chunk_bytes);
    a.bytes[v] = left >= 64 ? ~uint64_t(0) : (uint64_t(1) << left) - 1u;
  }
}

// int16 of 16 floats already on the grid's scale (rounded half to even, clamped to ±lim)
inline __m512i round16(__m512 v, float lim) {
  v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-lim)), _mm512_set1_ps(lim));
  return _mm512_cvtps_epi32(v);
}

// Symmetric int16 grids per (row, group) for linear_a16: q [M][Kp], a.step, a.qsum.
inline void q16_quantize_sym(const float* x, int64_t M, int64_t K, int64_t Kp, const int64_t* off, int G, int16_t* q,
                             Q16Acts& a) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    int16_t* qm = q + m * Kp;
    for (int g = 0; g < G; ++g) {
      const int64_t k0 = off[g], len = off[g + 1] - off[g];
      __m512 amax = _mm512_setzero_ps();
      for (int64_t k = 0; k < len; k += 16) {
        const __mmask16 mk = len - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - k)) - 1u);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(mk, xm + k0 + k)));
      }
      const float top = _mm512_reduce_max_ps(amax);
      const float s = top / float(kQ16Max), inv = top > 0.f ? 1.0f / s : 0.f;
      __m512i sum = _mm512_setzero_si512();
      for (int64_t k = 0; k < len; k += 16) {
        const __mmask16 mk = len - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - k)) - 1u);
        const __m512i v = round16(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, xm + k0 + k), _mm512_set1_ps(inv)), kQ16Max);
        _mm256_mask_storeu_epi16(qm + k0 + k, mk, _mm512_cvtepi32_epi16(v));
        sum = _mm512_add_epi32(sum, _mm512_maskz_mov_epi32(mk, v));
      }
      a.step[m * G + g] = s;
      a.qsum[m * G + g] = s * float(_mm512_reduce_add_epi32(sum));
    }
    for (int64_t k = K; k < Kp; ++k) qm[k] = 0;
  }
}

// linear_aq's codes on its static grids, less the zero-points: q [M][Kp], a.step = act_scale, a.qsum.
inline void q16_quantize_grid(const float* x, int64_t M, int64_t K, int64_t Kp, const int64_t* off, int G,
                              const float* act_scale, const int32_t* act_zero, int act_bits, int16_t* q, Q16Acts& a) {
  Buf<uint8_t> codes(K);
  const int qmax = (1 << act_bits) - 1;
  for (int64_t m = 0; m < M; ++m) {
    int16_t* qm = q + m * Kp;
    for (int g = 0; g < G; ++g) {
      const int64_t k0 = off[g], len = off[g + 1] - off[g];
      const int32_t csum = quantize_span(x + m * K + k0, len, 1.0f / act_scale[g], act_zero[g], qmax, codes.p + k0);
      for (int64_t k = k0; k < k0 + len; ++k) qm[k] = int16_t(int32_t(codes[k]) - act_zero[g]);
      a.step[m * G + g] = act_scale[g];
      a.qsum[m * G + g] = act_scale[g] * float(csum - int32_t(len) * act_zero[g]);
    }
    for (int64_t k = K; k < Kp; ++k) qm[k] = 0;
  }
}

// The 64 codes of a chunk (its bytes masked by `bytes`) as words: lo = positions 0..15, 32..47, hi = 16..31, 48..63
// (8-bit: lo = 0..31, hi = 32..63).
template <int BITS>
struct Q16Decode;

template <>
struct Q16Decode<8> {  // byte j: code j
  Q16Decode() {}
  inline void operator()(const uint8_t* chunk, uint64_t bytes, __m512i& lo, __m512i& hi) const {
    const __m512i raw = _mm512_maskz_loadu_epi8(bytes, chunk);
    lo = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(raw));
    hi = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(raw, 1));
  }
};

template <>
struct Q16Decode<4> {  // byte j of a block: code j | code (j + 16) << 4
  __m512i nibble = _mm512_set1_epi16(0x0F);
  Q16Decode() {}  // an explicit constructor: compiled for this file's target
  inline void operator()(const uint8_t* chunk, uint64_t bytes, __m512i& lo, __m512i& hi) const {
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(__mmask32(bytes), chunk));
    lo = _mm512_and_si512(w, nibble);
    hi = _mm512_srli_epi16(w, 4);
  }
};

// block_q2 byte j: codes j, j + 8, j + 16, j + 24 at bits 0, 2, 4, 6; block_q3 adds bit i of a uint32 after the
// 8 bytes: bit 2 of code i. A dword permute copies each block into the two 128-bit lanes whose words it feeds,
// one byte shuffle per vector puts the q2 byte of word i's code in its low byte, and a per-word shift takes the
// crumb out; 3-bit ORs 4 into the words whose bit is set in the two uint32s (a mask register). (AVX-512 BW only:
// a cross-lane byte permute would need VBMI, which VNNI CPUs such as Cascade Lake lack.)
template <int BITS>
struct Q16DecodeCrumbs {
  __m512i lanes, idx, shift_lo, shift_hi, three, four;
  Q16DecodeCrumbs() {
    constexpr int dwords = block_bytes(BITS) / 4;  // 2 or 3 per block
    alignas(64) int32_t perm[16];
    alignas(64) int8_t ix[64];
    alignas(64) int16_t sl[32], sh[32];
    for (int d = 0; d < 16; ++d) perm[d] = (d / 8) * dwords + (d % 4 < dwords ? d % 4 : 0);  // lane L: block L / 2
    for (int i = 0; i < 32; ++i) {
      ix[2 * i] = int8_t(i % 8);  // the q2 byte of word i's code (in its block's lane)
      ix[2 * i + 1] = int8_t(0x80);  // a zero byte
      sl[i] = int16_t(2 * ((i % 16) / 8));       // lo: code i % 16 of the block
      sh[i] = int16_t(2 * ((16 + i % 16) / 8));  // hi: code 16 + i % 16
    }
    lanes = _mm512_load_si512(perm);
    idx = _mm512_load_si512(ix);
    shift_lo = _mm512_load_si512(sl);
    shift_hi = _mm512_load_si512(sh);
    three = _mm512_set1_epi16(3);
    four = _mm512_set1_epi16(4);
  }
  inline void operator()(const uint8_t* chunk, uint64_t bytes, __m512i& lo, __m512i& hi) const {
    const __m512i q2 = _mm512_shuffle_epi8(_mm512_permutexvar_epi32(lanes, _mm512_maskz_loadu_epi8(bytes, chunk)), idx);
    lo = _mm512_and_si512(_mm512_srlv_epi16(q2, shift_lo), three);
    hi = _mm512_and_si512(_mm512_srlv_epi16(q2, shift_hi), three);
    if constexpr (BITS == 3) {
      uint32_t h0, h1 = 0;
      std::memcpy(&h0, chunk + 8, 4);
      if (bytes >> 23) std::memcpy(&h1, chunk + 20, 4);  // the second block exists (not a row's last, lone block)
      lo = _mm512_mask_add_epi16(lo, __mmask32((h0 & 0xFFFFu) | h1 << 16), lo, four);  // + 4: bit 2 is clear
      hi = _mm512_mask_add_epi16(hi, __mmask32(h0 >> 16 | (h1 & 0xFFFF0000u)), hi, four);
    }
  }
};
template <> struct Q16Decode<3> : Q16DecodeCrumbs<3> {};
template <> struct Q16Decode<2> : Q16DecodeCrumbs<2> {};

// Σ c·q of one visit for one activation row: the decoded chunk against its staged words (exact int32)
inline __m512i q16_dot(__m512i lo, __m512i hi, const int16_t* xv) {
  const __m512i d = _mm512_dpwssd_epi32(_mm512_setzero_si512(), lo, _mm512_load_si512(xv));
  return _mm512_dpwssd_epi32(d, hi, _mm512_load_si512(xv + 32));
}

// Row n's factors f[m][g] = scale·s (f: [M][G + 16]) and zero-point terms cz[m] = Σ_g scale·zero·s·Σq, 16 groups a step.
template <int M>
inline void q16_row_factors(const Q16Acts& a, const float* sc, const uint8_t* zr, int G, float* f, __m512 (&cz)[M]) {
  const int64_t fs = G + 16;
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) cz[m] = _mm512_setzero_ps();
  for (int g = 0; g < G; g += 16) {
    const __mmask16 mk = G - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (G - g)) - 1u);
    const __m512 s = _mm512_maskz_loadu_ps(mk, sc + g);
    const __m512 sz = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, zr + g))));
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      cz[m] = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(mk, a.qsum.p + m * G + g), cz[m]);
      _mm512_storeu_ps(f + m * fs + g, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(mk, a.step.p + m * G + g)));
    }
  }
}

// Output rows [n0, n1); f: scratch [2][M][G + 16] for the per-row factors.
template <int M, int BITS>
void q16_rows(const Q16Acts& a, const uint8_t* qw, int64_t rb, const float* scales, const uint8_t* zeros, int G,
              int64_t n0, int64_t n1, int64_t N, const float* bias, float* y, float* f) {
  const int64_t nv = a.sg.n, fs = G + 16;
  const int64_t* chunk = a.sg.chunk;
  const Q16Decode<BITS> dec;
  const int64_t cb = 2 * block_bytes(BITS);  // bytes per chunk
  int64_t n = n0;
  if constexpr (M > 1) {
    // Two output rows a pass: every staged activation vector, loaded once, serves both (with several activation
    // rows the loads of the staged activations, not the weight stream, bound the kernel).
    for (; n + 2 <= n1; n += 2) {
      const uint8_t* row0 = qw + n * rb;
      const uint8_t* row1 = row0 + rb;
      float* f1 = f + M * fs;
      __m512 cz0[M], cz1[M], t[M], u[M];
      q16_row_factors<M>(a, scales + n * G, zeros + n * G, G, f, cz0);
      q16_row_factors<M>(a, scales + (n + 1) * G, zeros + (n + 1) * G, G, f1, cz1);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) t[m] = u[m] = _mm512_setzero_ps();
      for (int64_t v = 0; v < nv; ++v) {
        __m512i lo0, hi0, lo1, hi1;
        dec(row0 + chunk[v] * cb, a.bytes.p[v], lo0, hi0);
        dec(row1 + chunk[v] * cb, a.bytes.p[v], lo1, hi1);
        const int16_t* xv = a.xq.p + v * M * kQ16Chunk;
        const int32_t g = a.group.p[v];
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const __m512i d0 = q16_dot(lo0, hi0, xv + m * kQ16Chunk), d1 = q16_dot(lo1, hi1, xv + m * kQ16Chunk);
          t[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(f[m * fs + g]), t[m]);
          u[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_set1_ps(f1[m * fs + g]), u[m]);
        }
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        y[m * N + n] = _mm512_reduce_add_ps(_mm512_sub_ps(t[m], cz0[m])) + (bias ? bias[n] : 0.f);
        y[m * N + n + 1] = _mm512_reduce_add_ps(_mm512_sub_ps(u[m], cz1[m])) + (bias ? bias[n + 1] : 0.f);
      }
    }
  }
  for (; n < n1; ++n) {
    const uint8_t* row = qw + n * rb;
    __m512 cz[M];
    q16_row_factors<M>(a, scales + n * G, zeros + n * G, G, f, cz);
    // two float accumulators per row: the FMA chain's latency, not the visits, would bound a single one
    __m512 t0[M], t1[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) t0[m] = t1[m] = _mm512_setzero_ps();
    int64_t v = 0;
    for (; v + 2 <= nv; v += 2) {
      __m512i lo0, hi0, lo1, hi1;  // decoded once, used by every activation row
      dec(row + chunk[v] * cb, a.bytes.p[v], lo0, hi0);
      dec(row + chunk[v + 1] * cb, a.bytes.p[v + 1], lo1, hi1);
      const int16_t* xv = a.xq.p + v * M * kQ16Chunk;
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const __m512i d0 = q16_dot(lo0, hi0, xv + m * kQ16Chunk);
        const __m512i d1 = q16_dot(lo1, hi1, xv + (M + m) * kQ16Chunk);
        t0[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(f[m * fs + a.group.p[v]]), t0[m]);
        t1[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_set1_ps(f[m * fs + a.group.p[v + 1]]), t1[m]);
      }
    }
    if (v < nv) {
      __m512i lo, hi;
      dec(row + chunk[v] * cb, a.bytes.p[v], lo, hi);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const __m512i d = q16_dot(lo, hi, a.xq.p + (v * M + m) * kQ16Chunk);
        t0[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(f[m * fs + a.group.p[v]]), t0[m]);
      }
    }
    const float b = bias ? bias[n] : 0.f;
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) y[m * N + n] = _mm512_reduce_add_ps(_mm512_sub_ps(_mm512_add_ps(t0[m], t1[m]), cz[m])) + b;
  }
}

// The W{2,3,4,8} GEMV on int16 activations (linear_a16's when act_scale is null; the table's gemv_aq)
void q16_gemv(const float* x, int64_t M, const uint8_t* qw, const float* scales, const uint8_t* zeros,
              const int32_t* gs, int G, int64_t N, int64_t K, int bits, const float* act_scale,
              const int32_t* act_zero, int act_bits, const float* bias, float* y) {
  const int64_t rb = row_bytes(K, bits);
  q16_drive<Q16Acts>(x, M, gs, G, N, K, bits, act_scale, act_zero, act_bits,
                     [&](auto rows, auto width, const Q16Acts& a, int64_t n0, int64_t n1) {
                       constexpr int R = decltype(rows)::value, B = decltype(width)::value;
                       Buf<float> f(2 * R * (G + 16));
                       q16_rows<R, B>(a, qw, rb, scales, zeros, G, n0, n1, N, bias, y, f.p);
                     });
}

void v_linear_a16(const float* x, int64_t M, const uint8_t* qw, const float* scales, const uint8_t* zeros,
                  const int32_t* gs, int G, int64_t N, int64_t K, int bits, const float* bias, float* y) {
  if (M > kGemvMaxRows || M < 1 || K < 1) return g_linear_a16(x, M, qw, scales, zeros, gs, G, N, K, bits, bias, y);
  if (use_q16_gemv())
    return q16_gemv(x, M, qw, scales, zeros, gs, G, N, K, bits, nullptr, nullptr, 0, bias, y);
  // RPTQ_FLOAT_GEMV=1: the float GEMV, float32 activations
  if (bits == 4) return v_gemvb<4>(x, M, qw, scales, zeros, gs, G, N, K, bias, y);
  if (bits == 3) return v_gemvb<3>(x, M, qw, scales, zeros, gs, G, N, K, bias, y);
  Segments sg;
  sg.build(gs, G, 16);
  // masked activations, segment-major: xs[s][m][16]
  Buf<float> xs(sg.n * 16 * M);
  Buf<float> xsum(M * G);
  stage_segments(x, M, K, sg, G, 16, 1.0f, xs.p, xsum.p);
  const int64_t rb = row_bytes(K, bits);
  // 3 and 4 bits took the block kernels above; 2 and 8 bits decode 16 codes a chunk
  if (bits == 2) return gemv<2>(M, xs.p, sg, xsum.p, qw, rb, scales, zeros, G, N, bias, y);
  return gemv<8>(M, xs.p, sg, xsum.p, qw, rb, scales, zeros, G, N, bias, y);
}

// ---- W{2,3,4}A{≤8} integer GEMM with VNNI ------------------------------------------------------------
// x is quantized per group to u8 codes a; weights stay u8 codes c (< 16, a valid s8 operand).
// For a group g of length L:  Σ (a − za)(c − zw) = Σ a·c − zw·Σa − za·Σc + L·za·zw, an exact int32.
// Σ a·c runs on vpdpbusd: a tile of 64 output columns is repacked (once per call) into the VNNI
// layout Wt[k/4][64 columns][4 bytes]; each activation k-step (4 codes, bytes outside the group
// zeroed; a step straddling two groups is issued once for each) is broadcast against it, 6 rows ×
// 64 columns in 24 accumulators. At each group's end the epilogue subtracts the zero-point terms in
// int32, converts, and multiplies by act_scale[g]·scale[n, g] into float accumulators.
constexpr int kNT = 64;  // output columns per tile (4 vectors)
constexpr int kMB = 6;   // rows per micro-tile

// Accumulators are named variables (GCC spills an array of vectors to the stack every k-step).
#define RPTQ_ACC_ROW(r)                                                                        \
  __m512i c##r##0 = _mm512_setzero_si512(), c##r##1 = _mm512_setzero_si512(),                  \
          c##r##2 = _mm512_setzero_si512(), c##r##3 = _mm512_setzero_si512();
#define RPTQ_DP_ROW(r)                                                                         \
  if constexpr (MB > r) {                                                                      \
    const __m512i av = _mm512_set1_epi32(int32_t(a[r]));                                       \
    c##r##0 = _mm512_dpbusd_epi32(c##r##0, av, w0);                                            \
    c##r##1 = _mm512_dpbusd_epi32(c##r##1, av, w1);                                            \
    c##r##2 = _mm512_dpbusd_epi32(c##r##2, av, w2);                                            \
    c##r##3 = _mm512_dpbusd_epi32(c##r##3, av, w3);                                            \
  }
#define RPTQ_SAVE_ROW(r)                                                                       \
  if constexpr (MB > r) {                                                                      \
    _mm512_store_si512(out + (r * 4 + 0) * 16, c##r##0);                                      \
    _mm512_store_si512(out + (r * 4 + 1) * 16, c##r##1);                                      \
    _mm512_store_si512(out + (r * 4 + 2) * 16, c##r##2);                                      \
    _mm512_store_si512(out + (r * 4 + 3) * 16, c##r##3);                                      \
  }

// Σ over segments [s0, s1) of a·c for MB rows × 64 columns → out[MB*4][16] int32
template <int MB>
inline void aq_dot(const uint32_t* aw, const Segments& sg, int64_t s0, int64_t s1, const uint32_t* wt, int32_t* out) {
  RPTQ_ACC_ROW(0) RPTQ_ACC_ROW(1) RPTQ_ACC_ROW(2) RPTQ_ACC_ROW(3) RPTQ_ACC_ROW(4) RPTQ_ACC_ROW(5)
  for (int64_t s = s0; s < s1; ++s) {
    const uint32_t* wrow = wt + sg.chunk[s] * kNT;
    const __m512i w0 = _mm512_load_si512(wrow), w1 = _mm512_load_si512(wrow + 16);
    const __m512i w2 = _mm512_load_si512(wrow + 32), w3 = _mm512_load_si512(wrow + 48);
    const uint32_t* a = aw + s * kMB;
    RPTQ_DP_ROW(0) RPTQ_DP_ROW(1) RPTQ_DP_ROW(2) RPTQ_DP_ROW(3) RPTQ_DP_ROW(4) RPTQ_DP_ROW(5)
  }
  RPTQ_SAVE_ROW(0) RPTQ_SAVE_ROW(1) RPTQ_SAVE_ROW(2) RPTQ_SAVE_ROW(3) RPTQ_SAVE_ROW(4) RPTQ_SAVE_ROW(5)
}

template <int MB>
void aq_micro(const uint32_t* aw, const int32_t* asum, const Segments& sg, int G, const IntGemmTile& t, float* facc) {
  // aw: [seg][kMB] activation words of these rows; asum: [kMB][G]; facc: [kMB][64] float accumulators
  alignas(64) int32_t acc[kMB * 4 * 16];
  for (int g = 0; g < G; ++g) {
    aq_dot<MB>(aw, sg, sg.first[g], sg.first[g + 1], t.wt, acc);
    for (int j = 0; j < 4; ++j) {
      const __m512i zw = _mm512_load_si512(t.zw + g * kNT + 16 * j);
      const __m512i kc = _mm512_load_si512(t.kc + g * kNT + 16 * j);
      const __m512 sc = _mm512_load_ps(t.sc + g * kNT + 16 * j);
      for (int r = 0; r < MB; ++r) {
        __m512i d = _mm512_load_si512(acc + (r * 4 + j) * 16);
        d = _mm512_sub_epi32(d, _mm512_mullo_epi32(zw, _mm512_set1_epi32(asum[r * G + g])));
        d = _mm512_sub_epi32(d, kc);
        float* f = facc + r * kNT + 16 * j;
        _mm512_store_ps(f, _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, _mm512_load_ps(f)));
      }
    }
  }
}

// Repack nn (≤ 64) packed rows into the VNNI tile wt[k4][64] (u32 = 4 codes of one column); missing
// columns are zero. k-blocks of 16 chunks outer so that the scattered stores stay in L1.
template <int BITS>
void repack_tile_b(const uint8_t* rows, int64_t rb, int64_t nn, int64_t K16, uint32_t* wt) {
  for (int64_t c0 = 0; c0 < K16; c0 += 16) {
    const int64_t c1 = imin(K16, c0 + 16);
    for (int64_t j = 0; j < kNT; ++j) {
      if (j >= nn) {
        for (int64_t c = c0; c < c1; ++c)
          for (int i = 0; i < 4; ++i) wt[(4 * c + i) * kNT + j] = 0;
        continue;
      }
      const uint8_t* row = rows + j * rb;
      for (int64_t c = c0; c < c1; ++c) {
        alignas(16) uint32_t w4[4];
        _mm_store_si128(reinterpret_cast<__m128i*>(w4), _mm512_cvtepi32_epi8(unpack16<BITS>(row, c)));
        for (int i = 0; i < 4; ++i) wt[(4 * c + i) * kNT + j] = w4[i];
      }
    }
  }
}

void repack_tile(const uint8_t* rows, int64_t rb, int64_t nn, int64_t K16, int bits, uint32_t* wt) {
  switch (bits) {
    case 2: return repack_tile_b<2>(rows, rb, nn, K16, wt);
    case 3: return repack_tile_b<3>(rows, rb, nn, K16, wt);
    default: return repack_tile_b<4>(rows, rb, nn, K16, wt);
  }
}

// Σ codes over the segments [s0, s1) (the group's bytes only) for the 64 columns of a tile
inline void csum_tile(const Segments& sg, int64_t s0, int64_t s1, const uint32_t* wt, int32_t* out) {
  __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0;
  for (int64_t s = s0; s < s1; ++s) {
    const uint32_t mk = uint32_t(sg.mask[s]);
    const uint32_t ones = (mk & 1 ? 0x01u : 0u) | (mk & 2 ? 0x0100u : 0u) | (mk & 4 ? 0x010000u : 0u) |
                          (mk & 8 ? 0x01000000u : 0u);
    const __m512i av = _mm512_set1_epi32(int32_t(ones));
    const uint32_t* wrow = wt + sg.chunk[s] * kNT;
    c0 = _mm512_dpbusd_epi32(c0, av, _mm512_load_si512(wrow));
    c1 = _mm512_dpbusd_epi32(c1, av, _mm512_load_si512(wrow + 16));
    c2 = _mm512_dpbusd_epi32(c2, av, _mm512_load_si512(wrow + 32));
    c3 = _mm512_dpbusd_epi32(c3, av, _mm512_load_si512(wrow + 48));
  }
  _mm512_store_si512(out, c0);
  _mm512_store_si512(out + 16, c1);
  _mm512_store_si512(out + 32, c2);
  _mm512_store_si512(out + 48, c3);
}

// The per-(group, column) constants of one repacked weight tile (columns n0..n0+nn, zero past nn): the weight
// zero-points, the zero-point cross term za·Σc − len·za·zw, and the combined scale act_scale·w_scale.
inline void tile_group_params(const Segments& sg, const int64_t* off, int G, const uint32_t* wt, int64_t n0,
                              int64_t nn, const uint8_t* zeros, const float* scales, const float* act_scale,
                              const int32_t* act_zero, int32_t* zw, int32_t* kc, float* sc) {
  for (int g = 0; g < G; ++g) {
    alignas(64) int32_t cs[4 * 16];
    csum_tile(sg, sg.first[g], sg.first[g + 1], wt, cs);
    const int32_t za = act_zero[g], len = int32_t(off[g + 1] - off[g]);
    for (int64_t j = 0; j < kNT; ++j) {
      const int32_t z = j < nn ? zeros[(n0 + j) * G + g] : 0;
      zw[g * kNT + j] = z;
      kc[g * kNT + j] = za * cs[j] - len * za * z;
      sc[g * kNT + j] = j < nn ? act_scale[g] * scales[(n0 + j) * G + g] : 0.f;
    }
  }
}

// The pieces of int_gemm_drive (generic.inc): the table's linear_aq is int_gemm_drive<IntGemm>
struct IntGemm {
  static constexpr int kRows = kMB, kCols = kNT, kRepackCodes = 16;
  static constexpr auto quantize_span = avx512::quantize_span;
  static constexpr auto repack = repack_tile;
  static constexpr auto tile_params = tile_group_params;
  template <int MB>
  static constexpr auto micro = aq_micro<MB>;
};

// ---- decode attention over the packed KV cache -------------------------------------------------------
// score = Σ_d q_d (c_d − z_d) s_d · scaling = Σ_d q'_d c_d − Σ_d q'_d z_d with q' = q · s · scaling:
// K codes are converted to float in registers and multiplied with q'; out_d = s_d (Σ_s p_s c_sd − z_d Σ p_s)
// accumulates raw V codes. The fp K/V of the cache never exist in memory.

// exp for x ≤ 0 (Cephes-style: 2^n · p(r), |error| ≈ 1 ulp)
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// softmax of sc[0..len) in place (float32), then P on the p_bits grid
inline void softmax_row(float* sc, int64_t len, int p_bits) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  int64_t s = 0;
  for (; s + 16 <= len; s += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sc + s));
  float m = _mm512_reduce_max_ps(mx);
  for (; s < len; ++s) m = sc[s] > m ? sc[s] : m;
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (s = 0; s < len; s += 16) {
    const __mmask16 mk = len - s >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - s)) - 1u);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sc + s), mv));
    _mm512_mask_storeu_ps(sc + s, mk, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mk, e));
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
  const bool grid = p_bits < 16;
  const __m512 lv = _mm512_set1_ps(float((1 << (p_bits < 16 ? p_bits : 1)) - 1));
  for (s = 0; s < len; s += 16) {
    const __mmask16 mk = len - s >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - s)) - 1u);
    __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, sc + s), inv);
    if (grid)
      p = _mm512_div_ps(_mm512_roundscale_ps(_mm512_mul_ps(p, lv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lv);
    _mm512_mask_storeu_ps(sc + s, mk, p);
  }
}

// Σ_s p_s · codes_s for one query, head dims in C registers (C = 4 or 8 chunks of 16)

template <int BITS, int C>
inline void pv_fixed(const float* p, int64_t kv_len, const uint8_t* vb, int64_t rb, float* out) {
  __m512 a[C];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) a[c] = _mm512_setzero_ps();
  for (int64_t s = 0; s < kv_len; ++s) {
    const float ps = p[s];
    if (ps == 0.f) continue;
    const __m512 pv = _mm512_set1_ps(ps);
    const uint8_t* row = vb + s * rb;
    if (s + kPrefetchKv < kv_len) _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchKv * rb), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) a[c] = _mm512_fmadd_ps(pv, unpack16_ps<BITS>(row, c), a[c]);
  }
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) _mm512_store_ps(out + 16 * c, a[c]);
}

// The ISA pieces of simd_decode_attention (generic.inc), 16 lanes wide.
struct Attention {
  static constexpr int64_t kLanes = 16;

  template <int BITS>
  static float qk(const uint8_t* row, const float* q, int64_t C) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 2 <= C; c += 2) {
      a0 = _mm512_fmadd_ps(unpack16_ps<BITS>(row, c), _mm512_load_ps(q + 16 * c), a0);
      a1 = _mm512_fmadd_ps(unpack16_ps<BITS>(row, c + 1), _mm512_load_ps(q + 16 * c + 16), a1);
    }
    if (c < C) a0 = _mm512_fmadd_ps(unpack16_ps<BITS>(row, c), _mm512_load_ps(q + 16 * c), a0);
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  }

  template <int BITS>
  static void scores(const uint8_t* kb, int64_t rb, int64_t kv_len, const float* qs, const float* qc, int64_t nq,
                     int64_t C, float* sc) {
    float_scores<Attention, BITS>(kb, rb, kv_len, qs, qc, nq, C, sc);
  }

  static void softmax_row(float* sc, int64_t len, int p_bits) { avx512::softmax_row(sc, len, p_bits); }

  // head_dim 128 or 64 (C = 8 or 4) keeps a query's whole output row in registers over the cache
  template <int BITS>
  static void pv(const float* p, int64_t nq, int64_t kv_len, const uint8_t* vb, int64_t rb, int64_t C, int /*p_bits*/,
                 float* acc, float* psum) {
    sum_probs(p, nq, kv_len, psum);
    if (C == 8) {
      for (int64_t j = 0; j < nq; ++j) pv_fixed<BITS, 8>(p + j * kv_len, kv_len, vb, rb, acc + j * C * 16);
      return;
    }
    if (C == 4) {
      for (int64_t j = 0; j < nq; ++j) pv_fixed<BITS, 4>(p + j * kv_len, kv_len, vb, rb, acc + j * C * 16);
      return;
    }
    for (int64_t i = 0; i < nq * C * 16; ++i) acc[i] = 0.f;
    for (int64_t s = 0; s < kv_len; ++s) {
      const uint8_t* row = vb + s * rb;
      for (int64_t c = 0; c < C; ++c) {
        const __m512 v = unpack16_ps<BITS>(row, c);
        for (int64_t j = 0; j < nq; ++j) {
          float* a = acc + (j * C + c) * 16;
          _mm512_store_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(p[j * kv_len + s]), v, _mm512_load_ps(a)));
        }
      }
    }
  }
};

// ---- dequantize rows to float32 (the prefill GEMM path feeds these to torch's sgemm) -------------------
template <int BITS>
void dequant_rows(const uint8_t* qw, const float* scales, const uint8_t* zeros, const Segments& sg, int G,
                  int64_t N, int64_t K, float* out) {
  const int64_t rb = row_bytes(K, BITS);
#pragma omp parallel for schedule(static) if (N * K > kParallelMin)
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* row = qw + n * rb;
    float* o = out + n * K;
    for (int g = 0; g < G; ++g) {
      const __m512 s = _mm512_set1_ps(scales[n * G + g]), z = _mm512_set1_ps(float(zeros[n * G + g]));
      for (int64_t i = sg.first[g]; i < sg.first[g + 1]; ++i) {
        const int64_t c = sg.chunk[i];
        const int64_t valid = imin(16, K - c * 16);
        const __mmask16 mk = __mmask16(sg.mask[i] & ((1u << valid) - 1u));
        _mm512_mask_storeu_ps(o + c * 16, mk, _mm512_mul_ps(_mm512_sub_ps(unpack16_ps<BITS>(row, c), z), s));
      }
    }
  }
}

void v_dequant_weight(const uint8_t* qw, const float* scales, const uint8_t* zeros, const int32_t* gs, int G,
                      int64_t N, int64_t K, int bits, float* out) {
  if (K < 1) return;
  Segments sg;
  sg.build(gs, G, 16);
  switch (bits) {
    case 2: return dequant_rows<2>(qw, scales, zeros, sg, G, N, K, out);
    case 3: return dequant_rows<3>(qw, scales, zeros, sg, G, N, K, out);
    case 4: return dequant_rows<4>(qw, scales, zeros, sg, G, N, K, out);
    default: return dequant_rows<8>(qw, scales, zeros, sg, G, N, K, out);
  }
}

}  // namespace
}  // namespace avx512
}  // namespace rptq_cpu
#pragma GCC pop_options

namespace rptq_cpu {
void fill_avx512(KernelTable* t) {
  avx512::fill_generic(t);
  t->linear_a16 = avx512::v_linear_a16;
  t->linear_aq = avx512::int_gemm_drive<avx512::IntGemm>;
  t->gemv_aq = avx512::use_q16_gemv() ? avx512::q16_gemv : nullptr;  // linear_aq's grids are never null
  t->dequant_weight = avx512::v_dequant_weight;
  t->decode_attention = avx512::simd_decode_attention<avx512::Attention>;
  t->isa = "avx512vnni";
}
}  // namespace rptq_cpu

// ==== AMX (int8 tiles) variant of the integer GEMM ====================================================
// Same math as int_gemm_drive<IntGemm>; the Σ a·c of a group runs on TDPBUSD: 32 rows × 32 columns in four 16×16
// int32 tiles, 64 k per step. Activations are laid out per (32-row block, 64-k segment) with the bytes
// outside the segment's group zeroed; the B tiles are 16 k/4-rows of the same VNNI tile [k/4][64][4].
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi2,amx-tile,amx-int8")
namespace rptq_cpu {
namespace avx512 {
namespace {

struct TileConfig {
  uint8_t palette_id = 1, start_row = 0;
  uint8_t reserved[14] = {0};
  uint16_t colsb[16] = {0};
  uint8_t rows[16] = {0};
};

constexpr int kAmxMB = 32;

void v_linear_aq_amx(const float* x, int64_t M, const uint8_t* qw, const float* scales, const uint8_t* zeros,
                     const int32_t* gs, int G, int64_t N, int64_t K, int bits, const float* act_scale,
                     const int32_t* act_zero, int act_bits, const float* bias, float* y) {
  if (bits > kIntGemmMaxBits || K < 1)
    throw std::invalid_argument("rptq: the AMX GEMM needs K >= 1 and weights of at most 4 bits");
  if (M < 1 || N < 1) return;  // y is empty
  Buf<int64_t> off(G + 1);
  group_offsets(gs, G, off.p);
  Segments sg4, sg64;
  sg4.build(gs, G, 4);
  sg64.build(gs, G, 64);
  const int64_t K16 = (K + 15) / 16, K64 = (K + 63) / 64, ns = sg64.n;
  const int64_t nmb = (M + kAmxMB - 1) / kAmxMB;
  Buf<uint8_t> a64(nmb * ns * kAmxMB * 64);  // [mb][seg][32 rows][64 bytes]
  Buf<int32_t> asum(nmb * kAmxMB * G);
  const int qmax = (1 << act_bits) - 1;
#pragma omp parallel if (M * K > kParallelMin)
  {
    Buf<uint8_t> am(K64 * 64);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < nmb * kAmxMB; ++m) {
      for (int64_t k = 0; k < K64 * 64; ++k) am[k] = 0;
      for (int g = 0; g < G; ++g) {
        int32_t sum = 0;
        if (m < M) {
          const float inv = 1.0f / act_scale[g];
          const int32_t z = act_zero[g];
          sum = quantize_span(x + m * K + off[g], off[g + 1] - off[g], inv, z, qmax, am.p + off[g]);
        }
        asum[m * G + g] = sum;
      }
      const int64_t mb = m / kAmxMB, r = m % kAmxMB;
      for (int64_t s = 0; s < ns; ++s) {
        const __m512i v = _mm512_maskz_loadu_epi8(__mmask64(sg64.mask[s]), am.p + sg64.chunk[s] * 64);
        _mm512_storeu_si512(a64.p + ((mb * ns + s) * kAmxMB + r) * 64, v);
      }
    }
  }
  const int64_t rb = row_bytes(K, bits);
  const int64_t ntiles = (N + kNT - 1) / kNT;
#pragma omp parallel if (M * N * K > kParallelMin)
  {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) {
      cfg.rows[t] = 16;
      cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
    Buf<uint32_t> wt(K64 * 16 * kNT);
    Buf<int32_t> zw(G * kNT), kc(G * kNT);
    Buf<float> sc(G * kNT);
    Buf<float> facc(kAmxMB * kNT);
    alignas(64) int32_t cbuf[2 * 4 * 256];  // two groups' C tiles (double buffer)
    for (int64_t i = K16 * 4 * kNT; i < K64 * 16 * kNT; ++i) wt[i] = 0;  // k/4-rows past K (a is 0 there)
#pragma omp for schedule(dynamic, 1)
    for (int64_t tile = 0; tile < ntiles; ++tile) {
      const int64_t n0 = tile * kNT, nn = imin(kNT, N - n0);
      repack_tile(qw + n0 * rb, rb, nn, K16, bits, wt.p);
      tile_group_params(sg4, off.p, G, wt.p, n0, nn, zeros, scales, act_scale, act_zero, zw.p, kc.p, sc.p);
      for (int64_t mb = 0; mb < nmb; ++mb) {
        for (int i = 0; i < kAmxMB * kNT; ++i) facc[i] = 0.f;
        const int32_t* as = asum.p + mb * kAmxMB * G;
        for (int nb = 0; nb < kNT / 32; ++nb) {
          if (nb * 32 >= nn) break;
          // Software pipeline: group g's TDPBUSDs are issued, then the vector epilogue of group g − 1 runs
          // (from the other buffer) while the tile unit works, then g's tiles are stored.
          for (int g = 0; g <= G; ++g) {
            if (g < G) {
              _tile_zero(0);
              _tile_zero(1);
              _tile_zero(2);
              _tile_zero(3);
              for (int64_t s = sg64.first[g]; s < sg64.first[g + 1]; ++s) {
                const uint8_t* ab = a64.p + (mb * ns + s) * kAmxMB * 64;
                const uint32_t* bb = wt.p + sg64.chunk[s] * 16 * kNT + nb * 32;
                _tile_loadd(4, ab, 64);
                _tile_loadd(5, ab + 16 * 64, 64);
                _tile_loadd(6, bb, kNT * 4);
                _tile_loadd(7, bb + 16, kNT * 4);
                _tile_dpbusd(0, 4, 6);
                _tile_dpbusd(1, 4, 7);
                _tile_dpbusd(2, 5, 6);
                _tile_dpbusd(3, 5, 7);
              }
            }
            if (g > 0) {
              const int gp = g - 1;
              const int32_t* cb = cbuf + (gp & 1) * 1024;
              for (int h = 0; h < 2; ++h) {
                const int64_t col = nb * 32 + h * 16;
                const __m512i zwv = _mm512_load_si512(zw.p + gp * kNT + col);
                const __m512i kcv = _mm512_load_si512(kc.p + gp * kNT + col);
                const __m512 scv = _mm512_load_ps(sc.p + gp * kNT + col);
                for (int r = 0; r < kAmxMB; ++r) {
                  const int32_t* c = cb + ((r >= 16) * 2 + h) * 256 + (r & 15) * 16;
                  __m512i d = _mm512_sub_epi32(_mm512_load_si512(c),
                                               _mm512_mullo_epi32(zwv, _mm512_set1_epi32(as[r * G + gp])));
                  d = _mm512_sub_epi32(d, kcv);
                  float* f = facc.p + r * kNT + col;
                  _mm512_store_ps(f, _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scv, _mm512_load_ps(f)));
                }
              }
            }
            if (g < G) {
              int32_t* cb = cbuf + (g & 1) * 1024;
              _tile_stored(0, cb, 64);
              _tile_stored(1, cb + 256, 64);
              _tile_stored(2, cb + 512, 64);
              _tile_stored(3, cb + 768, 64);
            }
          }
        }
        const int64_t rows = imin(kAmxMB, M - mb * kAmxMB);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < nn; ++j)
            y[(mb * kAmxMB + r) * N + n0 + j] = facc[r * kNT + j] + (bias ? bias[n0 + j] : 0.f);
      }
    }
    _tile_release();
  }
}

// AMX pays a fixed cost per group (drain the tiles, store, epilogue); with small groups VNNI wins
// (measured here, 1 thread, M = 512, K = N = 4096: 32 groups 22 vs 34 ms, 128 groups 50 vs 51 ms).
void v_linear_aq_best(const float* x, int64_t M, const uint8_t* qw, const float* scales, const uint8_t* zeros,
                      const int32_t* gs, int G, int64_t N, int64_t K, int bits, const float* act_scale,
                      const int32_t* act_zero, int act_bits, const float* bias, float* y) {
  if (K >= 64 * int64_t(G) && M >= kAmxMB / 2)
    return v_linear_aq_amx(x, M, qw, scales, zeros, gs, G, N, K, bits, act_scale, act_zero, act_bits, bias, y);
  return int_gemm_drive<IntGemm>(x, M, qw, scales, zeros, gs, G, N, K, bits, act_scale, act_zero, act_bits, bias, y);
}

}  // namespace
}  // namespace avx512
}  // namespace rptq_cpu
#pragma GCC pop_options

namespace rptq_cpu {
// The kernel lets a process use the AMX tile state only after asking (Linux ≥ 5.16).
bool amx_usable() {
  static const bool ok = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-int8") || !__builtin_cpu_supports("avx512vnni")) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

void fill_amx(KernelTable* t) {
  fill_avx512(t);
  t->linear_aq = avx512::v_linear_aq_best;
  t->isa = "amx";
}
}  // namespace rptq_cpu
