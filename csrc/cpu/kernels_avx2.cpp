// AVX2 + FMA kernels. The portable kernels are compiled for this ISA (GCC vectorizes them); the
// memory-bound decode ops (the integer W·A16 GEMV, weight dequantization, decode attention) and the integer
// W·A8/W·A4 GEMM are replaced with intrinsics, 256 bits wide. Only headers without AVX2-specific inline code come before the pragma.
#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
#define RPTQ_NS avx2
#include "generic.inc"

namespace rptq_cpu {
namespace avx2 {
namespace {

constexpr int64_t kPrefetchRows = 2;

inline __m256i load8(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(v)));
}

// 8 codes (chunk c = codes 8c..8c+7 of a row) as int32 lanes, from the block_q{BITS} layout
template <int BITS>
inline __m256i unpack8(const uint8_t* row, int64_t c) {
  if constexpr (BITS == 8) {
    return load8(row + c * 8);
  } else if constexpr (BITS == 4) {
    const int q = int(c & 3);
    const __m256i v = load8(row + (c >> 2) * 16 + (q & 1) * 8);
    return _mm256_and_si256(_mm256_srli_epi32(v, (q >> 1) * 4), _mm256_set1_epi32(15));
  } else {
    const uint8_t* blk = row + (c >> 2) * block_bytes(BITS);
    const int q = int(c & 3);
    __m256i v = _mm256_and_si256(_mm256_srli_epi32(load8(blk), 2 * q), _mm256_set1_epi32(3));
    if constexpr (BITS == 3) {
      uint32_t hi;
      std::memcpy(&hi, blk + 8, 4);
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      __m256i hb = _mm256_srlv_epi32(_mm256_set1_epi32(int32_t(hi)), _mm256_add_epi32(lane, _mm256_set1_epi32(8 * q)));
      v = _mm256_or_si256(v, _mm256_slli_epi32(_mm256_and_si256(hb, _mm256_set1_epi32(1)), 2));
    }
    return v;
  }
}

template <int BITS>
inline __m256 unpack8_ps(const uint8_t* row, int64_t c) {
  return _mm256_cvtepi32_ps(unpack8<BITS>(row, c));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 dwords, all ones where bit i of `mask` is set (lane i)
inline __m256i lane_mask8(uint32_t mask) {
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int32_t(mask)), bits), bits);
}

inline __m256 maskz_load8(const float* p, uint32_t mask) { return _mm256_maskload_ps(p, lane_mask8(mask)); }

inline void mask_store8(float* p, uint32_t mask, __m256 v) { _mm256_maskstore_ps(p, lane_mask8(mask), v); }

// ---- W·A16 GEMV on float32 activations (≤ 8 rows; RPTQ_FLOAT_GEMV=1): 8-lane chunks ----------------------
template <int M, int BITS>
void gemv_rows(const float* xs, const Segments& sg, const float* xsum, const uint8_t* qw, int64_t rb,
               const float* scales, const uint8_t* zeros, int G, int64_t n0, int64_t n1, int64_t N,
               const float* bias, float* y) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = qw + n * rb;
    if (n + kPrefetchRows < n1)
      for (int64_t i = 0; i < rb; i += 64) _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * rb + i), _MM_HINT_T0);
    const float* sc = scales + n * G;
    const uint8_t* zr = zeros + n * G;
    float tot[M], corr[M];
    for (int m = 0; m < M; ++m) tot[m] = corr[m] = 0.f;
    for (int g = 0; g < G; ++g) {
      __m256 acc[M];
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
      for (int64_t s = sg.first[g]; s < sg.first[g + 1]; ++s) {
        const __m256 w = unpack8_ps<BITS>(row, sg.chunk[s]);
        const float* xv = xs + s * 8 * M;
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(w, _mm256_load_ps(xv + 8 * m), acc[m]);
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        tot[m] += sc[g] * hsum8(acc[m]);
        corr[m] += sc[g] * float(zr[g]) * xsum[m * G + g];
      }
    }
    const float b = bias ? bias[n] : 0.f;
    for (int m = 0; m < M; ++m) y[m * N + n] = tot[m] - corr[m] + b;
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

// ---- W{2,3,4,8} GEMV on int16 activations (≤ kGemvMaxRows rows): the codes never become floats ------------
// kernels_avx512.cpp's method (see there: the grids, the visits, the numerics), 16 words a vector. A 64-code
// chunk (two blocks) decodes to four vectors of 16 words, the codes at chunk positions 0..15, 16..31, 32..47 and
// 48..63 in order (Q16Decode), so the activations are staged as they are, only masked to the visit's group; four
// vpmaddwd (AVX2's half of VNNI's vpdpwssd) give exact int32 partial sums, |Σ| ≤ 8·255·32767 < 2^31, converted
// and scaled once per visit:
//   y[m, n] = Σ_g scale[n,g]·s[m,g]·(Σ_{k∈g} c_k·q_k − zero[n,g]·Σ_{k∈g} q_k) + bias[n].

// Small groups take runs instead of visits (q16_run_rows): each chunk is decoded once, and each of its four
// 16-word vectors (a run) is scaled by the factor of the group of its first code. A run that crosses into further
// groups is read there with the codes of those groups zeroed, and each further group's part of it is one fix:
// the same decoded run (kept from the main pass) against only that part's activations, scaled by that group's
// factor. Exact like the visits (each code meets its own group's factor once), but a chunk holding parts of four
// groups costs four runs and three fixes of one vpmaddwd each, not four visits of four vpmaddwd and a decode each.
constexpr int kQ16Run = 16;

inline int64_t codes_of(const int32_t* gs, int G) {
  int64_t k = 0;
  for (int g = 0; g < G; ++g) k += gs[g];
  return k;
}

// (group, lanes-wide chunk) pairs of the groups gs: the visits Segments::build makes at that width
inline int64_t group_spans(const int32_t* gs, int G, int lanes) {
  int64_t n = 0, s = 0;
  for (int g = 0; g < G; ++g) {
    const int64_t e = s + gs[g];
    n += gs[g] ? (e - 1) / lanes - s / lanes + 1 : 0;
    s = e;
  }
  return n;
}

// The fixes of the groups gs: every (group, run) pair but the group of each run's first code
inline int64_t fixes_of(const int32_t* gs, int G) {
  return group_spans(gs, G, kQ16Run) - (codes_of(gs, G) + kQ16Run - 1) / kQ16Run;
}

// Runs or visits, whichever costs less by the per-row times measured on AVX2 (docs/kernels.md): about 4.2 ns a
// visit against 1.9 ns a run and 1.5 ns a fix. Groups of whole chunks (g64, g128) take visits.
inline bool runs_cost_less(const int32_t* gs, int G) {
  const int64_t runs = (codes_of(gs, G) + kQ16Run - 1) / kQ16Run;
  return 42 * group_spans(gs, G, kQ16Chunk) > 19 * runs + 15 * fixes_of(gs, G);
}

// The activations of one call for M rows over groups gs, staged for q16_rows (visits) or q16_run_rows (runs).
struct Q16Acts {
  bool by_runs;            // runs_cost_less(gs, G)
  Segments sg;             // visits: 64-code chunks × groups (none by runs; built before the buffers it sizes)
  Buf<int32_t> group;      // [visits] the group of each visit
  Buf<int16_t> xq;         // [visits][M][64]: the visit's chunk of activations, zero outside its group
  int64_t runs;            // by runs: Kp / 16, else 0
  Buf<int32_t> run_group;  // [runs] the group of each run's first code (the last group for runs past K)
  int64_t fixes;           // by runs: the parts of runs that lie in groups other than the run's first
  Buf<int32_t> fix_run;    // [fixes] the run of each fix
  Buf<int32_t> fix_group;  // [fixes] its group
  Buf<int32_t> fix_span;   // [fixes][2] its codes' positions [lo, hi) in the run
  Buf<int16_t> xf;         // [fixes][M][16]: the run's activations, zero outside the fix's group
  Buf<int16_t> xr;         // [M][Kp] if there are fixes: the activations, each run's zero outside its first group
  const int16_t* q = nullptr;  // by runs: the activations [M][Kp] the runs read (q16_drive's, or xr)
  int64_t Kp = 0;
  Buf<float> step;         // [M][G] grid step s
  Buf<float> qsum;         // [M][G] s·Σ q (the zero-point term)
  Q16Acts(const int32_t* gs, int G, int64_t M)
      : by_runs(runs_cost_less(gs, G)),
        group(((by_runs ? void() : sg.build(gs, G, kQ16Chunk)), sg.n)),
        xq(sg.n * M * kQ16Chunk),
        runs(by_runs ? (codes_of(gs, G) + kQ16Chunk - 1) / kQ16Chunk * (kQ16Chunk / kQ16Run) : 0),
        run_group(runs),
        fixes(by_runs ? fixes_of(gs, G) : 0),
        fix_run(fixes),
        fix_group(fixes),
        fix_span(2 * fixes),
        xf(fixes * M * kQ16Run),
        xr(fixes ? M * runs * kQ16Run : 0),
        step(M * G),
        qsum(M * G) {
    for (int g = 0; g < G && !by_runs; ++g)
      for (int64_t v = sg.first[g]; v < sg.first[g + 1]; ++v) group[v] = g;
    for (int64_t r = 0, g = 0, end = gs[0]; r < runs; ++r) {
      while (g + 1 < G && r * kQ16Run >= end) end += gs[++g];
      run_group[r] = int32_t(g);
    }
    for (int64_t g = 0, s = 0, i = 0; g < G && fixes; s += gs[g++])
      for (int64_t r = s / kQ16Run; gs[g] && r <= (s + gs[g] - 1) / kQ16Run; ++r)
        if (run_group[r] != g) {
          fix_run[i] = int32_t(r);
          fix_group[i] = int32_t(g);
          fix_span[2 * i] = int32_t(imax(s, r * kQ16Run) - r * kQ16Run);
          fix_span[2 * i + 1] = int32_t(imin(s + gs[g], (r + 1) * kQ16Run) - r * kQ16Run);
          ++i;
        }
  }
};

// 16 words, all ones where bit i of `bits` is set (word i)
inline __m256i word_mask(uint32_t bits) {
  const __m256i bit = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                        int16_t(0x8000));
  return _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16(int16_t(bits)), bit), bit);
}

// Stage M rows of int16 activations q [M][Kp] (Kp = K rounded up to kQ16Chunk, zero past K): into the visits (in
// code order whatever the rows' width and length), or for the runs into the fixes and, where there are fixes, a
// copy with the fixes' codes zeroed.
inline void q16_stage(const int16_t* q, int64_t M, int64_t Kp, int64_t /*rb*/, int /*bits*/, Q16Acts& a) {
  a.Kp = Kp;
  a.q = q;
  if (a.fixes) {
    std::memcpy(a.xr.p, q, sizeof(int16_t) * M * Kp);
    a.q = a.xr.p;
  }
  for (int64_t i = 0; i < a.fixes; ++i) {  // the fix's codes move from the run to the fix
    const int lo = a.fix_span[2 * i], hi = a.fix_span[2 * i + 1];
    for (int64_t m = 0; m < M; ++m) {
      int16_t* run = a.xr.p + m * Kp + a.fix_run[i] * kQ16Run;
      int16_t* part = a.xf.p + (i * M + m) * kQ16Run;
      for (int j = 0; j < kQ16Run; ++j) {
        part[j] = j >= lo && j < hi ? run[j] : int16_t(0);
        if (j >= lo && j < hi) run[j] = 0;
      }
    }
  }
  for (int64_t v = 0; v < a.sg.n; ++v) {
    const uint64_t mk = a.sg.mask[v];
    for (int64_t m = 0; m < M; ++m) {
      const int16_t* src = q + m * Kp + a.sg.chunk[v] * kQ16Chunk;
      int16_t* dst = a.xq.p + (v * M + m) * kQ16Chunk;
      for (int h = 0; h < 4; ++h) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16 * h));
        _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 16 * h),
                           _mm256_and_si256(w, word_mask(uint32_t(mk >> (16 * h)) & 0xFFFFu)));
      }
    }
  }
}

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline int32_t hsum8i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// The sums of a[0..7]'s lanes, as lanes 0..7 of one vector
inline __m256i hsum8x8(const __m256i (&a)[8]) {
  const __m256i h01 = _mm256_hadd_epi32(a[0], a[1]), h23 = _mm256_hadd_epi32(a[2], a[3]);
  const __m256i h45 = _mm256_hadd_epi32(a[4], a[5]), h67 = _mm256_hadd_epi32(a[6], a[7]);
  const __m256i lo = _mm256_hadd_epi32(h01, h23), hi = _mm256_hadd_epi32(h45, h67);  // 128-bit halves' sums
  return _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
}

// The sums of a[0..7]'s lanes, as lanes 0..7 of one vector (floats)
inline __m256 hsum8x8_ps(const __m256 (&a)[8]) {
  const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);  // 128-bit halves' sums
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

// The 8 int32 of v as int16 at out[0..n) (n ≤ 8; values within int16)
inline void store_words(int16_t* out, __m256i v, int64_t n) {
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  if (n >= 8) return _mm_storeu_si128(reinterpret_cast<__m128i*>(out), w);
  alignas(16) int16_t tmp[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(tmp), w);
  for (int64_t i = 0; i < n; ++i) out[i] = tmp[i];
}

inline uint32_t lanes_below(int64_t n) { return n >= 8 ? 0xFFu : (1u << n) - 1u; }

// Symmetric int16 grids per (row, group) for linear_a16: q [M][Kp], a.step, a.qsum (kernels_avx512.cpp's
// q16_quantize_sym: x·(1/s), rounded half to even, clamped).
inline void q16_quantize_sym(const float* x, int64_t M, int64_t K, int64_t Kp, const int64_t* off, int G, int16_t* q,
                             Q16Acts& a) {
  const __m256 sign = _mm256_set1_ps(-0.0f), lim = _mm256_set1_ps(float(kQ16Max));
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    int16_t* qm = q + m * Kp;
    for (int g = 0; g < G; ++g) {
      const int64_t k0 = off[g], len = off[g + 1] - off[g];
      __m256 amax = _mm256_setzero_ps();
      for (int64_t k = 0; k < len; k += 8)
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, maskz_load8(xm + k0 + k, lanes_below(len - k))));
      const float top = hmax8(amax);
      const float s = top / float(kQ16Max), inv = top > 0.f ? 1.0f / s : 0.f;
      __m256i sum = _mm256_setzero_si256();
      for (int64_t k = 0; k < len; k += 8) {  // lanes past the group load 0 and round to 0
        __m256 v = _mm256_mul_ps(maskz_load8(xm + k0 + k, lanes_below(len - k)), _mm256_set1_ps(inv));
        v = _mm256_min_ps(_mm256_max_ps(v, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
        const __m256i c = _mm256_cvtps_epi32(v);
        store_words(qm + k0 + k, c, len - k);
        sum = _mm256_add_epi32(sum, c);
      }
      a.step[m * G + g] = s;
      a.qsum[m * G + g] = s * float(hsum8i(sum));
    }
    for (int64_t k = K; k < Kp; ++k) qm[k] = 0;
  }
}

// linear_aq's codes on its static grids, less the zero-points: q [M][Kp], a.step = act_scale, a.qsum. The codes
// are quantize_one's (x·inv rounded half to even, + zero, clamped): the reference's integers.
inline void q16_quantize_grid(const float* x, int64_t M, int64_t K, int64_t Kp, const int64_t* off, int G,
                              const float* act_scale, const int32_t* act_zero, int act_bits, int16_t* q, Q16Acts& a) {
  const __m256 qmax = _mm256_set1_ps(float((1 << act_bits) - 1));
  for (int64_t m = 0; m < M; ++m) {
    int16_t* qm = q + m * Kp;
    for (int g = 0; g < G; ++g) {
      const int64_t k0 = off[g], len = off[g + 1] - off[g];
      const __m256 inv = _mm256_set1_ps(1.0f / act_scale[g]), zero = _mm256_set1_ps(float(act_zero[g]));
      __m256i sum = _mm256_setzero_si256();
      for (int64_t k = 0; k < len; k += 8) {
        const uint32_t lanes = lanes_below(len - k);
        __m256 v = _mm256_round_ps(_mm256_mul_ps(maskz_load8(x + m * K + k0 + k, lanes), inv),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, zero), _mm256_setzero_ps()), qmax);
        const __m256i c = _mm256_sub_epi32(_mm256_cvtps_epi32(v), _mm256_set1_epi32(act_zero[g]));  // code − zero
        store_words(qm + k0 + k, c, len - k);
        sum = _mm256_add_epi32(sum, _mm256_and_si256(c, lane_mask8(lanes)));
      }
      a.step[m * G + g] = act_scale[g];
      a.qsum[m * G + g] = act_scale[g] * float(hsum8i(sum));
    }
    for (int64_t k = K; k < Kp; ++k) qm[k] = 0;
  }
}

// The 64 codes of a chunk, blocks b0 and b1, as four vectors of 16 words: chunk positions 0..15, 16..31, 32..47,
// 48..63.
template <int BITS>
struct Q16Decode;

template <>
struct Q16Decode<8> {  // byte j: code j
  Q16Decode() {}
  inline void operator()(const uint8_t* b0, const uint8_t* b1, __m256i (&w)[4]) const {
    for (int h = 0; h < 4; ++h)
      w[h] = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>((h < 2 ? b0 : b1) + 16 * (h % 2))));
  }
};

template <>
struct Q16Decode<4> {  // byte j of a block: code j | code (j + 16) << 4
  __m256i nibble = _mm256_set1_epi16(0x0F);
  Q16Decode() {}  // an explicit constructor: compiled for this file's target
  inline void operator()(const uint8_t* b0, const uint8_t* b1, __m256i (&w)[4]) const {
    for (int b = 0; b < 2; ++b) {
      const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b ? b1 : b0)));
      w[2 * b] = _mm256_and_si256(bytes, nibble);
      w[2 * b + 1] = _mm256_srli_epi16(bytes, 4);
    }
  }
};

// block_q2 byte j: codes j, j + 8, j + 16, j + 24 at bits 0, 2, 4, 6; block_q3 adds a uint32 after the 8 bytes
// whose bit i is bit 2 of code i. Word i of the block's bytes twice over holds byte i % 8; a multiply by
// 2^(14 − shift) moves the crumb of code i (i < 16) or 16 + i to the top two bits, which one shift brings down.
template <int BITS>
struct Q16DecodeCrumbs {
  __m256i lift_lo = _mm256_setr_epi16(16384, 16384, 16384, 16384, 16384, 16384, 16384, 16384,  //
                                      4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096);
  __m256i lift_hi = _mm256_setr_epi16(1024, 1024, 1024, 1024, 1024, 1024, 1024, 1024,  //
                                      256, 256, 256, 256, 256, 256, 256, 256);
  __m256i four = _mm256_set1_epi16(4);
  Q16DecodeCrumbs() {}
  inline void operator()(const uint8_t* b0, const uint8_t* b1, __m256i (&w)[4]) const {
    for (int b = 0; b < 2; ++b) {
      const uint8_t* block = b ? b1 : b0;
      const __m128i q2 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block));
      const __m256i bytes = _mm256_cvtepu8_epi16(_mm_unpacklo_epi64(q2, q2));
      w[2 * b] = _mm256_srli_epi16(_mm256_mullo_epi16(bytes, lift_lo), 14);
      w[2 * b + 1] = _mm256_srli_epi16(_mm256_mullo_epi16(bytes, lift_hi), 14);
      if constexpr (BITS == 3) {
        uint32_t high;
        std::memcpy(&high, block + 8, 4);
        w[2 * b] = _mm256_or_si256(w[2 * b], _mm256_and_si256(word_mask(high & 0xFFFFu), four));
        w[2 * b + 1] = _mm256_or_si256(w[2 * b + 1], _mm256_and_si256(word_mask(high >> 16), four));
      }
    }
  }
};
template <> struct Q16Decode<3> : Q16DecodeCrumbs<3> {};
template <> struct Q16Decode<2> : Q16DecodeCrumbs<2> {};

// Σ c·q of one visit for one activation row: the decoded chunk against its staged words (exact int32 lanes)
inline __m256i q16_dot(const __m256i (&w)[4], const int16_t* xv) {
  const __m256i* x = reinterpret_cast<const __m256i*>(xv);
  const __m256i d01 = _mm256_add_epi32(_mm256_madd_epi16(w[0], _mm256_load_si256(x)),
                                       _mm256_madd_epi16(w[1], _mm256_load_si256(x + 1)));
  const __m256i d23 = _mm256_add_epi32(_mm256_madd_epi16(w[2], _mm256_load_si256(x + 2)),
                                       _mm256_madd_epi16(w[3], _mm256_load_si256(x + 3)));
  return _mm256_add_epi32(d01, d23);
}

// Row n's factors f[m][g] = scale·s (f: [M][G]) and zero-point terms cz[m] = Σ_g scale·zero·s·Σq.
template <int M>
inline void q16_row_factors(const Q16Acts& a, const float* sc, const uint8_t* zr, int G, float* f, float (&cz)[M]) {
  for (int m = 0; m < M; ++m) {
    __m256 acc = _mm256_setzero_ps();
    int g = 0;
    for (; g + 8 <= G; g += 8) {
      const __m256 s = _mm256_loadu_ps(sc + g);
      const __m256 z = _mm256_cvtepi32_ps(load8(zr + g));
      acc = _mm256_fmadd_ps(_mm256_mul_ps(s, z), _mm256_loadu_ps(a.qsum.p + m * G + g), acc);
      _mm256_storeu_ps(f + m * G + g, _mm256_mul_ps(s, _mm256_loadu_ps(a.step.p + m * G + g)));
    }
    float c = hsum8(acc);
    for (; g < G; ++g) {
      c += sc[g] * float(zr[g]) * a.qsum.p[m * G + g];
      f[m * G + g] = sc[g] * a.step.p[m * G + g];
    }
    cz[m] = c;
  }
}

// The missing second block of a last chunk (rows of an odd number of blocks end in half a chunk)
alignas(32) static const uint8_t kZeroBlock[block_bytes(8)] = {0};

// Output rows [n0, n1), each: its factors f [M][G] = scale·s and zero-point terms (f: scratch), two
// accumulators per activation row, dots(row, t0, t1) adding the row's scaled dot products to them, and the sum
// into y. Two chains, for alternate visits or runs (the FMA's latency would otherwise bound the loop), where 16
// ymm registers hold them: up to 4 rows.
template <int M, class Dots>
inline void q16_each_row(const Q16Acts& a, const uint8_t* qw, int64_t rb, const float* scales, const uint8_t* zeros,
                         int G, int64_t n0, int64_t n1, int64_t N, const float* bias, float* y, float* f, Dots&& dots) {
  for (int64_t n = n0; n < n1; ++n) {
    float cz[M];
    q16_row_factors<M>(a, scales + n * G, zeros + n * G, G, f, cz);
    __m256 t0[M], t1[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) t0[m] = t1[m] = _mm256_setzero_ps();
    dots(qw + n * rb, t0, t1);
    const float b = bias ? bias[n] : 0.f;
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) y[m * N + n] = hsum8(_mm256_add_ps(t0[m], t1[m])) - cz[m] + b;
  }
}

// Output rows [n0, n1) by visits (q16_each_row).
template <int M, int BITS>
void q16_rows(const Q16Acts& a, const uint8_t* qw, int64_t rb, const float* scales, const uint8_t* zeros, int G,
              int64_t n0, int64_t n1, int64_t N, const float* bias, float* y, float* f) {
  constexpr bool kTwoChains = M <= 4;
  const int64_t nv = a.sg.n, cb = 2 * block_bytes(BITS);  // bytes per chunk
  const int64_t* chunk = a.sg.chunk;
  const int32_t* group = a.group.p;
  const Q16Decode<BITS> dec;
  q16_each_row<M>(a, qw, rb, scales, zeros, G, n0, n1, N, bias, y, f,
                  [&](const uint8_t* row, __m256 (&t0)[M], __m256 (&t1)[M]) {
    auto visit = [&](int64_t v, __m256 (&t)[M]) {
      const int64_t at = chunk[v] * cb;
      // the next row, chunk by chunk (the hardware prefetcher alone left one thread at a third of the bandwidth it
      // reads); past the last row it fetches nothing useful, and a prefetch never faults
      _mm_prefetch(reinterpret_cast<const char*>(row + rb + at), _MM_HINT_T0);
      __m256i w[4];
      dec(row + at, at + cb <= rb ? row + at + cb / 2 : kZeroBlock, w);  // a row's last chunk may hold one block
      const int16_t* xv = a.xq.p + v * M * kQ16Chunk;
      const float* fg = f + group[v];
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m)
        t[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q16_dot(w, xv + m * kQ16Chunk)), _mm256_set1_ps(fg[m * G]), t[m]);
    };
    int64_t v = 0;
    for (; v + 2 <= nv; v += 2) {
      visit(v, t0);
      visit(v + 1, kTwoChains ? t1 : t0);
    }
    if (v < nv) visit(v, t0);
  });
}

// Output rows [n0, n1) by runs (Q16Acts::by_runs): each chunk of a row is decoded once (Q16Decode's four vectors
// are its four runs), and each run is met with the activations in place, converted and scaled by the factor of its
// first code's group; then the fixes, on the runs kept in `decoded` ([runs][16] words, scratch, if there are
// fixes). One pass over the chunks, the same for every row: no loop per group, whose varying trip counts (one or
// two runs for RPTQ's small clusters) would cost a mispredicted branch every few runs.
template <int M, int BITS, bool kFixes>
void q16_run_rows(const Q16Acts& a, const uint8_t* qw, int64_t rb, const float* scales, const uint8_t* zeros, int G,
                  int64_t n0, int64_t n1, int64_t N, const float* bias, float* y, float* f, int16_t* decoded) {
  constexpr bool kTwoChains = M <= 4;
  constexpr int64_t cb = 2 * block_bytes(BITS);  // bytes per chunk
  const int64_t chunks = a.Kp / kQ16Chunk;
  const int32_t* run_group = a.run_group.p;
  const Q16Decode<BITS> dec;
  q16_each_row<M>(a, qw, rb, scales, zeros, G, n0, n1, N, bias, y, f,
                  [&](const uint8_t* row, __m256 (&t0)[M], __m256 (&t1)[M]) {
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t at = c * cb;
      _mm_prefetch(reinterpret_cast<const char*>(row + rb + at), _MM_HINT_T0);  // the next row (as q16_rows)
      __m256i w[4];
      dec(row + at, at + cb <= rb ? row + at + cb / 2 : kZeroBlock, w);
#pragma GCC unroll 4
      for (int h = 0; h < 4; ++h) {
        const int64_t r = 4 * c + h;
        if constexpr (kFixes) _mm256_store_si256(reinterpret_cast<__m256i*>(decoded + r * kQ16Run), w[h]);
        const float* fg = f + run_group[r];
        __m256(&t)[M] = (h & 1) && kTwoChains ? t1 : t0;
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(a.q + m * a.Kp + r * kQ16Run));
          t[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(w[h], x)), _mm256_set1_ps(fg[m * G]), t[m]);
        }
      }
    }
    if constexpr (kFixes) {
      auto fix = [&](int64_t i, __m256 (&t)[M]) {
        const __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(decoded + a.fix_run.p[i] * kQ16Run));
        const int16_t* xv = a.xf.p + i * M * kQ16Run;
        const float* fg = f + a.fix_group.p[i];
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(xv + m * kQ16Run));
          t[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(w, x)), _mm256_set1_ps(fg[m * G]), t[m]);
        }
      };
      int64_t i = 0;
      for (; i + 2 <= a.fixes; i += 2) {
        fix(i, t0);
        fix(i + 1, kTwoChains ? t1 : t0);
      }
      if (i < a.fixes) fix(i, t0);
    }
  });
}

// The W{2,3,4,8} GEMV on int16 activations (linear_a16's when act_scale is null; the table's gemv_aq)
void q16_gemv(const float* x, int64_t M, const uint8_t* qw, const float* scales, const uint8_t* zeros,
              const int32_t* gs, int G, int64_t N, int64_t K, int bits, const float* act_scale,
              const int32_t* act_zero, int act_bits, const float* bias, float* y) {
  const int64_t rb = row_bytes(K, bits);
  q16_drive<Q16Acts>(x, M, gs, G, N, K, bits, act_scale, act_zero, act_bits,
                     [&](auto rows, auto width, const Q16Acts& a, int64_t n0, int64_t n1) {
                       constexpr int R = decltype(rows)::value, B = decltype(width)::value;
                       Buf<float> f(R * G);
                       Buf<int16_t> decoded(a.fixes ? a.runs * kQ16Run : 0);
                       if (a.by_runs && a.fixes)
                         q16_run_rows<R, B, true>(a, qw, rb, scales, zeros, G, n0, n1, N, bias, y, f.p, decoded.p);
                       else if (a.by_runs)
                         q16_run_rows<R, B, false>(a, qw, rb, scales, zeros, G, n0, n1, N, bias, y, f.p, nullptr);
                       else
                         q16_rows<R, B>(a, qw, rb, scales, zeros, G, n0, n1, N, bias, y, f.p);
                     });
}

void v_linear_a16(const float* x, int64_t M, const uint8_t* qw, const float* scales, const uint8_t* zeros,
                  const int32_t* gs, int G, int64_t N, int64_t K, int bits, const float* bias, float* y) {
  if (M > kGemvMaxRows || M < 1 || K < 1) return g_linear_a16(x, M, qw, scales, zeros, gs, G, N, K, bits, bias, y);
  if (use_q16_gemv())
    return q16_gemv(x, M, qw, scales, zeros, gs, G, N, K, bits, nullptr, nullptr, 0, bias, y);
  // RPTQ_FLOAT_GEMV=1: the float GEMV, float32 activations
  const int MT = M <= 4 ? int(M) : 8;  // template row count (padding rows are zero and not stored)
  Segments sg;
  sg.build(gs, G, 8);
  Buf<float> xs(sg.n * 8 * MT);
  Buf<float> xsum(MT * G);
  for (int g = 0; g < G; ++g) {
    for (int64_t m = 0; m < MT; ++m) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t s = sg.first[g]; s < sg.first[g + 1]; ++s) {
        const int64_t c = sg.chunk[s];
        const int64_t valid = imin(8, K - c * 8);
        const uint32_t mk = m < M ? uint32_t(sg.mask[s] & ((1u << valid) - 1u)) : 0u;
        const __m256 v = maskz_load8(x + m * K + c * 8, mk);
        _mm256_store_ps(xs.p + (s * MT + m) * 8, v);
        acc = _mm256_add_ps(acc, v);
      }
      xsum[m * G + g] = hsum8(acc);
    }
  }
  Buf<float> yt(MT * N);
  const int64_t rb = row_bytes(K, bits);
  switch (bits) {
    case 2: gemv<2>(MT, xs.p, sg, xsum.p, qw, rb, scales, zeros, G, N, bias, yt.p); break;
    case 3: gemv<3>(MT, xs.p, sg, xsum.p, qw, rb, scales, zeros, G, N, bias, yt.p); break;
    case 4: gemv<4>(MT, xs.p, sg, xsum.p, qw, rb, scales, zeros, G, N, bias, yt.p); break;
    default: gemv<8>(MT, xs.p, sg, xsum.p, qw, rb, scales, zeros, G, N, bias, yt.p);
  }
  std::memcpy(y, yt.p, sizeof(float) * M * N);
}

template <int BITS>
void dequant_rows(const uint8_t* qw, const float* scales, const uint8_t* zeros, const Segments& sg, int G,
                  int64_t N, int64_t K, float* out) {
  const int64_t rb = row_bytes(K, BITS);
#pragma omp parallel for schedule(static) if (N * K > kParallelMin)
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* row = qw + n * rb;
    float* o = out + n * K;
    for (int g = 0; g < G; ++g) {
      const __m256 s = _mm256_set1_ps(scales[n * G + g]), z = _mm256_set1_ps(float(zeros[n * G + g]));
      for (int64_t i = sg.first[g]; i < sg.first[g + 1]; ++i) {
        const int64_t c = sg.chunk[i];
        const int64_t valid = imin(8, K - c * 8);
        mask_store8(o + c * 8, uint32_t(sg.mask[i] & ((1u << valid) - 1u)),
                    _mm256_mul_ps(_mm256_sub_ps(unpack8_ps<BITS>(row, c), z), s));
      }
    }
  }
}

void v_dequant_weight(const uint8_t* qw, const float* scales, const uint8_t* zeros, const int32_t* gs, int G,
                      int64_t N, int64_t K, int bits, float* out) {
  if (K < 1) return;
  Segments sg;
  sg.build(gs, G, 8);
  switch (bits) {
    case 2: return dequant_rows<2>(qw, scales, zeros, sg, G, N, K, out);
    case 3: return dequant_rows<3>(qw, scales, zeros, sg, G, N, K, out);
    case 4: return dequant_rows<4>(qw, scales, zeros, sg, G, N, K, out);
    default: return dequant_rows<8>(qw, scales, zeros, sg, G, N, K, out);
  }
}

// ---- W{2,3,4}A{≤8} integer GEMM (> kGemvMaxRows rows) ------------------------------------------------------
// kernels_avx512.cpp's VNNI GEMM (its zero-point algebra, k-steps of 4 codes, weight tiles repacked per call into
// words of 4 codes of one column) on AVX2, which has no vpdpbusd: a k-step is vpmaddubsw (u8 activation codes ×
// weight codes, each pair summed in int16: ≤ 2·255·15, never saturates) then vpmaddwd by ones (the four products'
// sum, int32). Tiles of kAqCols = 16 output columns (two vectors); kAqRows = 4 rows in 8 accumulators.
constexpr int kAqCols = 16;
constexpr int kAqRows = 4;

// Codes of x[0..len) on one grid (quantize_one's integers: x·inv rounded half to even, + zero, clamped) into out;
// returns Σ codes.
inline int32_t quantize_span(const float* x, int64_t len, float inv, int32_t zero, int qmax, uint8_t* out) {
  const __m256 iv = _mm256_set1_ps(inv), zv = _mm256_set1_ps(float(zero)), hi = _mm256_set1_ps(float(qmax));
  __m256i sum = _mm256_setzero_si256();
  for (int64_t k = 0; k < len; k += 8) {
    const uint32_t lanes = lanes_below(len - k);
    __m256 v = _mm256_round_ps(_mm256_mul_ps(maskz_load8(x + k, lanes), iv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, zv), _mm256_setzero_ps()), hi);
    const __m256i q = _mm256_and_si256(_mm256_cvtps_epi32(v), lane_mask8(lanes));  // lanes past len: 0
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    const uint64_t bytes = uint64_t(_mm_cvtsi128_si64(_mm_packus_epi16(w, w)));
    std::memcpy(out + k, &bytes, size_t(imin(8, len - k)));
    sum = _mm256_add_epi32(sum, q);
  }
  return hsum8i(sum);
}

// Repack nn (≤ kAqCols) packed rows into the tile wt[k4][kAqCols] (a u32 = 4 codes of one column; missing columns
// zero), 8 codes (two k-steps) at a time; k-blocks outer so that the scattered stores stay in L1.
template <int BITS>
void aq_repack(const uint8_t* rows, int64_t rb, int64_t nn, int64_t K8, uint32_t* wt) {
  for (int64_t c0 = 0; c0 < K8; c0 += 32) {
    const int64_t c1 = imin(K8, c0 + 32);
    for (int64_t j = 0; j < kAqCols; ++j)
      for (int64_t c = c0; c < c1; ++c) {
        uint64_t codes = 0;
        if (j < nn) {
          const __m256i q = unpack8<BITS>(rows + j * rb, c);
          const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
          codes = uint64_t(_mm_cvtsi128_si64(_mm_packus_epi16(w, w)));
        }
        wt[2 * c * kAqCols + j] = uint32_t(codes);
        wt[(2 * c + 1) * kAqCols + j] = uint32_t(codes >> 32);
      }
  }
}

// a·w of one k-step for 8 columns: four u8 × s8 products summed per column, int32
inline __m256i aq_step(__m256i a, __m256i w) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, w), _mm256_set1_epi16(1));
}

// Σ over the segments [s0, s1) of a·c for MB rows × 16 columns → out[MB][2][8] int32. The accumulators are named
// variables (an array of vectors is spilled to the stack every step).
#define RPTQ_AQ_ACC(r) __m256i c##r##0 = _mm256_setzero_si256(), c##r##1 = _mm256_setzero_si256();
#define RPTQ_AQ_STEP(r)                                                 \
  if constexpr (MB > r) {                                               \
    const __m256i av = _mm256_set1_epi32(int32_t(a[r]));                \
    c##r##0 = _mm256_add_epi32(c##r##0, aq_step(av, w0));               \
    c##r##1 = _mm256_add_epi32(c##r##1, aq_step(av, w1));               \
  }
#define RPTQ_AQ_SAVE(r)                                                                          \
  if constexpr (MB > r) {                                                                        \
    _mm256_store_si256(reinterpret_cast<__m256i*>(out + (2 * r) * 8), c##r##0);                \
    _mm256_store_si256(reinterpret_cast<__m256i*>(out + (2 * r + 1) * 8), c##r##1);            \
  }

template <int MB>
inline void aq_dot(const uint32_t* aw, const Segments& sg, int64_t s0, int64_t s1, const uint32_t* wt, int32_t* out) {
  RPTQ_AQ_ACC(0) RPTQ_AQ_ACC(1) RPTQ_AQ_ACC(2) RPTQ_AQ_ACC(3)
  for (int64_t s = s0; s < s1; ++s) {
    const uint32_t* wrow = wt + sg.chunk[s] * kAqCols;
    const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(wrow));
    const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(wrow + 8));
    const uint32_t* a = aw + s * kAqRows;
    RPTQ_AQ_STEP(0) RPTQ_AQ_STEP(1) RPTQ_AQ_STEP(2) RPTQ_AQ_STEP(3)
  }
  RPTQ_AQ_SAVE(0) RPTQ_AQ_SAVE(1) RPTQ_AQ_SAVE(2) RPTQ_AQ_SAVE(3)
}

// The per-(group, column) constants of one weight tile (kernels_avx512.cpp's tile_group_params): zw the weight
// zero-points, kc = za·Σc − len·za·zw, sc = act_scale·w_scale; [G][kAqCols] each, zero past nn columns.
inline void aq_tile_params(const Segments& sg, const int64_t* off, int G, const uint32_t* wt, int64_t n0, int64_t nn,
                           const uint8_t* zeros, const float* scales, const float* act_scale, const int32_t* act_zero,
                           int32_t* zw, int32_t* kc, float* sc) {
  for (int g = 0; g < G; ++g) {
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();  // Σc over the group: an activation of ones
    for (int64_t s = sg.first[g]; s < sg.first[g + 1]; ++s) {
      const uint32_t mk = uint32_t(sg.mask[s]);
      const uint32_t ones = (mk & 1 ? 0x01u : 0u) | (mk & 2 ? 0x0100u : 0u) | (mk & 4 ? 0x010000u : 0u) |
                            (mk & 8 ? 0x01000000u : 0u);
      const __m256i av = _mm256_set1_epi32(int32_t(ones));
      const uint32_t* wrow = wt + sg.chunk[s] * kAqCols;
      s0 = _mm256_add_epi32(s0, aq_step(av, _mm256_load_si256(reinterpret_cast<const __m256i*>(wrow))));
      s1 = _mm256_add_epi32(s1, aq_step(av, _mm256_load_si256(reinterpret_cast<const __m256i*>(wrow + 8))));
    }
    alignas(32) int32_t cs[kAqCols];
    _mm256_store_si256(reinterpret_cast<__m256i*>(cs), s0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(cs + 8), s1);
    const int32_t za = act_zero[g], len = int32_t(off[g + 1] - off[g]);
    for (int64_t j = 0; j < kAqCols; ++j) {
      const int32_t z = j < nn ? zeros[(n0 + j) * G + g] : 0;
      zw[g * kAqCols + j] = z;
      kc[g * kAqCols + j] = za * cs[j] - len * za * z;
      sc[g * kAqCols + j] = j < nn ? act_scale[g] * scales[(n0 + j) * G + g] : 0.f;
    }
  }
}

// MB rows × one tile: per group the integer sums, less the zero-point terms, times the scales into facc [MB][16]
template <int MB>
void aq_micro(const uint32_t* aw, const int32_t* asum, const Segments& sg, int G, const IntGemmTile& t, float* facc) {
  alignas(32) int32_t acc[kAqRows * kAqCols];
  for (int g = 0; g < G; ++g) {
    aq_dot<MB>(aw, sg, sg.first[g], sg.first[g + 1], t.wt, acc);
    for (int j = 0; j < 2; ++j) {
      const __m256i zw = _mm256_load_si256(reinterpret_cast<const __m256i*>(t.zw + g * kAqCols + 8 * j));
      const __m256i kc = _mm256_load_si256(reinterpret_cast<const __m256i*>(t.kc + g * kAqCols + 8 * j));
      const __m256 sc = _mm256_load_ps(t.sc + g * kAqCols + 8 * j);
      for (int r = 0; r < MB; ++r) {
        __m256i d = _mm256_load_si256(reinterpret_cast<const __m256i*>(acc + (2 * r + j) * 8));
        d = _mm256_sub_epi32(d, _mm256_mullo_epi32(zw, _mm256_set1_epi32(asum[r * G + g])));
        d = _mm256_sub_epi32(d, kc);
        float* f = facc + r * kAqCols + 8 * j;
        _mm256_store_ps(f, _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), sc, _mm256_load_ps(f)));
      }
    }
  }
}

void aq_repack_bits(const uint8_t* rows, int64_t rb, int64_t nn, int64_t steps, int bits, uint32_t* wt) {
  switch (bits) {
    case 2: return aq_repack<2>(rows, rb, nn, steps, wt);
    case 3: return aq_repack<3>(rows, rb, nn, steps, wt);
    default: return aq_repack<4>(rows, rb, nn, steps, wt);
  }
}

// The pieces of int_gemm_drive (generic.inc): the table's linear_aq is int_gemm_drive<IntGemm>
struct IntGemm {
  static constexpr int kRows = kAqRows, kCols = kAqCols, kRepackCodes = 8;
  static constexpr auto quantize_span = avx2::quantize_span;
  static constexpr auto repack = aq_repack_bits;
  static constexpr auto tile_params = aq_tile_params;
  template <int MB>
  static constexpr auto micro = aq_micro<MB>;
};

// ---- decode attention (see kernels_avx512.cpp) ------------------------------------------------------
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline void softmax_row(float* sc, int64_t len, int p_bits) {
  __m256 m8 = _mm256_set1_ps(-INFINITY);
  int64_t s = 0;
  for (; s + 8 <= len; s += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(sc + s));
  float m = hmax8(m8);
  for (; s < len; ++s) m = sc[s] > m ? sc[s] : m;
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  s = 0;
  for (; s + 8 <= len; s += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sc + s), mv));
    _mm256_storeu_ps(sc + s, e);
    sum = _mm256_add_ps(sum, e);
  }
  float tail = 0.f;
  for (; s < len; ++s) {
    sc[s] = std::exp(sc[s] - m);
    tail += sc[s];
  }
  const float inv = 1.0f / (hsum8(sum) + tail);
  for (s = 0; s < len; ++s) sc[s] = round_p(sc[s] * inv, p_bits);
}

// The cache lines of [p, p + bytes), into L1 ahead of their use (a prefetch never faults)
inline void prefetch_lines(const uint8_t* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
}

// P·V's inner loop, both grids: V rows [s0, s1) of one 64-code chunk (byte `at` of a row), two at a time. Their
// decoded words are interleaved (unpacklo/hi_epi16), so that one vpmaddwd against a pair (w_s, w_{s+1}) per lane
// adds both rows' products: acc[2r + z] += unpack_z(run r of row s, run r of row s + 1) · pairs[2r + z], with
// weights(s, pairs) giving the row pair's 8 pair vectors. Accumulator 2r + z, lane L, element e holds code
// 16r + 8L + 4z + e of the chunk. `prefetch`: the rows kPrefetchKv ahead, both of each pair.
template <int BITS, class Weights>
inline void pv_row_pairs(const Q16Decode<BITS>& dec, const uint8_t* vb, int64_t rb, int64_t at, int64_t s0,
                         int64_t s1, int64_t kv_len, bool prefetch, Weights&& weights, __m256i (&acc)[8]) {
  constexpr int64_t cb = 2 * block_bytes(BITS);
  const bool whole = at + cb <= rb;  // rows of an odd number of blocks end in half a chunk
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_si256();
  for (int64_t s = s0; s < s1; s += 2) {
    const uint8_t* ra = vb + s * rb + at;
    const uint8_t* rn = s + 1 < kv_len ? ra + rb : ra;  // a last odd row meets a zero weight
    if (prefetch) prefetch_lines(ra + kPrefetchKv * rb, 2 * rb);
    __m256i wa[4], wb[4], pairs[8];
    dec(ra, whole ? ra + cb / 2 : kZeroBlock, wa);
    dec(rn, whole ? rn + cb / 2 : kZeroBlock, wb);
    weights(s, pairs);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      acc[2 * r] = _mm256_add_epi32(acc[2 * r], _mm256_madd_epi16(_mm256_unpacklo_epi16(wa[r], wb[r]), pairs[2 * r]));
      acc[2 * r + 1] =
          _mm256_add_epi32(acc[2 * r + 1], _mm256_madd_epi16(_mm256_unpackhi_epi16(wa[r], wb[r]), pairs[2 * r + 1]));
    }
  }
}

// o[code] += f[i] · acc[i] for the chunk's 64 codes (pv_row_pairs' accumulator order)
inline void add_pair_sums(float* o, const __m256i (&acc)[8], const __m256 (&f)[8]) {
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    alignas(32) float v[8];
    _mm256_store_ps(v, _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i]), f[i]));
    float* oi = o + 16 * (i / 2) + 4 * (i % 2);
    for (int e = 0; e < 4; ++e) {
      oi[e] += v[e];
      oi[8 + e] += v[4 + e];
    }
  }
}

// The ISA pieces of simd_decode_attention (generic.inc), 8 lanes wide.
struct Attention {
  static constexpr int64_t kLanes = 8;

  template <int BITS>
  static float qk(const uint8_t* row, const float* q, int64_t C) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 2 <= C; c += 2) {
      a0 = _mm256_fmadd_ps(unpack8_ps<BITS>(row, c), _mm256_load_ps(q + 8 * c), a0);
      a1 = _mm256_fmadd_ps(unpack8_ps<BITS>(row, c + 1), _mm256_load_ps(q + 8 * c + 8), a1);
    }
    if (c < C) a0 = _mm256_fmadd_ps(unpack8_ps<BITS>(row, c), _mm256_load_ps(q + 8 * c), a0);
    return hsum8(_mm256_add_ps(a0, a1));
  }

  // The scores in the integer domain (the GEMV's method): each query q' is rounded once to int16 on its own
  // symmetric grid, s_j = max|q'_j| / 32767, and each 64-code chunk of a K row meets it in four vpmaddwd (exact int32
  // sums): score = s_j · Σ_d q̂_jd · code_sd − qc[j]. Eight rows' sums are reduced together. Where the int32 sum could
  // overflow (8-bit codes, head_dim > 256) the float path runs.
  template <int BITS>
  static void scores(const uint8_t* kb, int64_t rb, int64_t kv_len, const float* qs, const float* qc, int64_t nq,
                     int64_t C, float* sc) {
    const int64_t chunks = (C * 8 + kQ16Chunk - 1) / kQ16Chunk, Dp = chunks * kQ16Chunk, cb = 2 * block_bytes(BITS);
    if (C * 8 * ((1 << BITS) - 1) * kQ16Max >= (int64_t(1) << 31))
      return float_scores<Attention, BITS>(kb, rb, kv_len, qs, qc, nq, C, sc);
    Buf<int16_t> qi(nq * Dp);
    Buf<float> step(nq);
    for (int64_t j = 0; j < nq; ++j) quantize_query(qs + j * C * 8, C, qi.p + j * Dp, Dp, step.p + j);
    const Q16Decode<BITS> dec;
    for (int64_t s0 = 0; s0 < kv_len; s0 += 8) {
      const int64_t rows = kv_len - s0 < 8 ? kv_len - s0 : 8;
      const uint8_t* tile = kb + s0 * rb;
      prefetch_lines(tile + kPrefetchKv * rb, rows * rb);
      for (int64_t j = 0; j < nq; ++j) {
        __m256i acc[8];
#pragma GCC unroll 8
        for (int r = 0; r < 8; ++r) {
          acc[r] = _mm256_setzero_si256();
          if (r >= rows) continue;
          const uint8_t* row = tile + r * rb;
          for (int64_t c = 0; c < chunks; ++c) {
            __m256i w[4];
            const int64_t at = c * cb;
            dec(row + at, at + cb <= rb ? row + at + cb / 2 : kZeroBlock, w);
            acc[r] = _mm256_add_epi32(acc[r], q16_dot(w, qi.p + j * Dp + c * kQ16Chunk));
          }
        }
        const __m256 v = _mm256_fmsub_ps(_mm256_cvtepi32_ps(hsum8x8(acc)), _mm256_set1_ps(step[j]), _mm256_set1_ps(qc[j]));
        mask_store8(sc + j * kv_len + s0, lanes_below(rows), v);
      }
    }
  }

  static void softmax_row(float* sc, int64_t len, int p_bits) { avx2::softmax_row(sc, len, p_bits); }

  // P·V in the integer domain too. Each query's P is rounded once to int16: to its levels where it lies on the
  // p_bits grid (p̂ = p·(2^p_bits − 1), exact), else to step max P / 32767. Two V rows at a time meet the broadcast
  // pair (p̂_s, p̂_{s+1}) (pv_row_pairs): exact int32 sums over a tile of kTile rows (|Σ| ≤ 128·32767·255 < 2^31),
  // then converted and scaled into acc.
  template <int BITS>
  static void pv(const float* p, int64_t nq, int64_t kv_len, const uint8_t* vb, int64_t rb, int64_t C, int p_bits,
                 float* acc, float* psum) {
    constexpr int64_t kTile = 128;  // rows: 8 KiB of 4-bit V at head_dim 128, in L1 for every query and chunk
    const int64_t chunks = (C * 8 + kQ16Chunk - 1) / kQ16Chunk, Dp = chunks * kQ16Chunk, cb = 2 * block_bytes(BITS);
    const int64_t pairs = (kv_len + 1) / 2;
    Buf<int32_t> pair(nq * pairs);
    Buf<float> step(nq), out(nq * Dp);
    for (int64_t j = 0; j < nq; ++j)
      step[j] = round_probs(p + j * kv_len, kv_len, p_bits, pair.p + j * pairs, psum + j);
    for (int64_t i = 0; i < nq * Dp; ++i) out[i] = 0.f;
    const Q16Decode<BITS> dec;
    for (int64_t s0 = 0; s0 < kv_len; s0 += kTile) {
      const int64_t s1 = s0 + kTile < kv_len ? s0 + kTile : kv_len;
      for (int64_t c = 0; c < chunks; ++c)
        for (int64_t j = 0; j < nq; ++j) {
          __m256i a[8];
          pv_row_pairs(dec, vb, rb, c * cb, s0, s1, kv_len, j == 0 && c == 0,
                       [&](int64_t s, __m256i (&pp)[8]) {
                         for (int i = 0; i < 8; ++i) pp[i] = _mm256_set1_epi32(pair[j * pairs + s / 2]);
                       }, a);
          __m256 f[8];
          for (int i = 0; i < 8; ++i) f[i] = _mm256_set1_ps(step[j]);
          add_pair_sums(out.p + j * Dp + c * kQ16Chunk, a, f);
        }
    }
    for (int64_t j = 0; j < nq; ++j)
      for (int64_t d = 0; d < C * 8; ++d) acc[j * C * 8 + d] = out[j * Dp + d];
  }

 private:
  // P [n] → p̂ as int16 pairs (p̂_{2i}, p̂_{2i+1}) in one int32 each (a zero after an odd last); returns the step
  // and its Σ p̂·step in *sum (exact integers: the zero-point term then sums exactly what the products used)
  static float round_probs(const float* p, int64_t n, int p_bits, int32_t* pairs, float* sum) {
    __m256 top8 = _mm256_setzero_ps();
    int64_t s = 0;
    for (; s + 8 <= n; s += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(p + s));
    float top = hmax8(top8);
    for (; s < n; ++s) top = p[s] > top ? p[s] : top;
    const bool grid = p_bits < 16;  // P = k / (2^p_bits − 1) already: its levels are integers ≤ 32767
    const float levels = grid ? float((1 << p_bits) - 1) : float(kQ16Max);
    const float step = grid ? 1.0f / levels : top / levels, inv = grid ? levels : (top > 0.f ? levels / top : 0.f);
    const __m256 inv8 = _mm256_set1_ps(inv), lim = _mm256_set1_ps(float(kQ16Max));
    int16_t* words = reinterpret_cast<int16_t*>(pairs);  // p̂_s is word s (little-endian: the pair's low half first)
    int64_t total = 0;
    for (s = 0; s + 8 <= n;) {
      __m256i total8 = _mm256_setzero_si256();  // 4096 steps of ≤ 32767 a lane: the lanes' sum stays < 2^31
      for (const int64_t end = n - 7 < s + 8 * 4096 ? n - 7 : s + 8 * 4096; s < end; s += 8) {
        const __m256i k = _mm256_cvtps_epi32(_mm256_min_ps(
            _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(p + s), inv8), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
            lim));
        store_words(words + s, k, 8);
        total8 = _mm256_add_epi32(total8, k);
      }
      total += hsum8i(total8);
    }
    for (; s < n; ++s) {
      words[s] = int16_t(std::fmin(std::nearbyint(p[s] * inv), float(kQ16Max)));
      total += words[s];
    }
    if (n % 2) words[n] = 0;
    *sum = float(double(step) * double(total));
    return step;
  }

  // q' [C·8] (zero past head_dim) → q̂ = round(q' / s) as int16 [Dp] (zero past C·8) with s = max|q'| / 32767
  static void quantize_query(const float* q, int64_t C, int16_t* out, int64_t Dp, float* step) {
    const __m256 sign = _mm256_set1_ps(-0.0f), lim = _mm256_set1_ps(float(kQ16Max));
    __m256 amax = _mm256_setzero_ps();
    for (int64_t c = 0; c < C; ++c) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_load_ps(q + 8 * c)));
    const float top = hmax8(amax), s = top / float(kQ16Max), inv = top > 0.f ? 1.0f / s : 0.f;
    for (int64_t c = 0; c < C; ++c) {
      __m256 v = _mm256_mul_ps(_mm256_load_ps(q + 8 * c), _mm256_set1_ps(inv));
      v = _mm256_min_ps(_mm256_max_ps(v, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
      store_words(out + 8 * c, _mm256_cvtps_epi32(v), 8);
    }
    for (int64_t d = C * 8; d < Dp; ++d) out[d] = 0;
    *step = s;
  }
};

// ---- decode attention over per-token grids (kv_token.inc's op) in the integer domain -------------------------
// Each token s of a kv head has its own grid per group g (the head's KV clusters, G ≤ 8): a_sg = scale,
// z_sg = zero, k_sd = a_{s,g(d)}·(c_sd − z_{s,g(d)}), and the same for V.
//   Scores: q' = q·scaling, rounded once per query to int16 on σ = max|q'| / 32767 (the static path's grid), and
//     score_s = σ·(Σ_d a_{s,g(d)}·q̂_d·c_sd − Σ_g a_sg·z_sg·Q_g), Q_g = Σ_{d∈g} q̂_d. A lane of the first sum
//     holds one channel: each decoded run of 16 codes meets q̂ with its odd words zeroed and with its even words
//     zeroed (two vpmaddwd; a lane's product ≤ 32767·255 converts to float exactly), and each lane is scaled by
//     its channel's a, the row's G scales permuted into place by a per-head lane → group table.
//   P·V: out_d = Σ_s w_{s,g(d)}·c_sd − Σ_s w_{s,g(d)}·z_{s,g(d)} with w_sg = p_s·a_sg, rounded per query and
//     group to int16 on max_s w_sg / 32767; two rows interleaved per vpmaddwd as in the static path, each lane's
//     pair (ŵ_{s,g}, ŵ_{s+1,g}) permuted from the row pair's G pairs by the lane's group. Σ ŵ·z is exact.
// More than 8 groups a head take the portable kernel.
constexpr int kTokenMaxGroups = 8;

inline __m256i load_lanes(const int32_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256i load_words(const int16_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }

// The grid of one token: a (8 lanes, zero past G) and, if asked, a·z and z. `wide`: eight scales and eight zeros
// may be read from here (the slab goes on): one load each, the lanes past G (the next tokens') masked off. A copy
// of G values into a vector would stall on its store (the load cannot be forwarded from narrower stores).
inline void token_grid(const uint16_t* scale, const uint8_t* zero, int G, bool wide, __m256* a, __m256* az,
                       __m256i* z = nullptr) {
  __m128i sv, zv;
  const __m128i keep = _mm_cmpgt_epi16(_mm_set1_epi16(int16_t(G)), _mm_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7));
  if (wide) {
    sv = _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scale)), keep);
    zv = _mm_and_si128(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zero)), _mm_packs_epi16(keep, keep));
  } else {
    alignas(16) uint16_t sb[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    alignas(16) uint8_t zb[16] = {0};
    for (int g = 0; g < G; ++g) {
      sb[g] = scale[g];
      zb[g] = zero[g];
    }
    sv = _mm_load_si128(reinterpret_cast<const __m128i*>(sb));
    zv = _mm_load_si128(reinterpret_cast<const __m128i*>(zb));
  }
  *a = _mm256_cvtph_ps(sv);
  const __m256i zi = _mm256_cvtepu8_epi32(zv);
  if (az) *az = _mm256_mul_ps(*a, _mm256_cvtepi32_ps(zi));
  if (z) *z = zi;
}

// One thread's tables and buffers for the (batch, kv head) tasks of one call, sized for blocks of up to nb queries
// over up to kv_len rows; nq and kv_len are those of the block being attended (attend sets them).
struct TokenHead {
  int64_t D, Dp, chunks, runs, nq, S, kv_len, rb;
  int Gk, Gv;
  Buf<int32_t> gk, gv;   // [Dp] channel → group (channels past D: group 0; their codes and q̂ are zero)
  Buf<int32_t> lane_k;   // [runs][2][8] scores: run r, parity e, lane i → group of channel 16r + 2i + e
  Buf<int32_t> lane_v;   // [chunks][8][8] P·V: accumulator 2r + z, lane 4L + e → group of code 16r + 8L + 4z + e
  Buf<int16_t> qe, qo;   // [nq][Dp] q̂ with its odd / even channels zeroed
  Buf<float> qgroup;     // [nq][8] Q_g
  Buf<float> sigma;      // [nq] q̂'s step
  Buf<float> sc;         // [nq][kv_len] scores, then P
  Buf<float> va;         // [kv_len][8] V's a per token
  Buf<int32_t> vzi;      // [kv_len][8] V's z per token
  Buf<int32_t> pairs;    // [kv_len / 2][8] (ŵ_{2i,g}, ŵ_{2i+1,g}) of one query
  Buf<float> out;        // [Dp] one query's Σ_s ŵ·step·c

  TokenHead(int64_t D_, int64_t nb, int64_t S_, int64_t kv_len_, int bits, int Gk_, int Gv_)
      : D(D_), Dp((D_ + kQ16Chunk - 1) / kQ16Chunk * kQ16Chunk), chunks(Dp / kQ16Chunk), runs(Dp / kQ16Run),
        nq(nb), S(S_), kv_len(kv_len_), rb(row_bytes(D_, bits)), Gk(Gk_), Gv(Gv_), gk(Dp), gv(Dp),
        lane_k(runs * 16), lane_v(chunks * 64), qe(nq * Dp), qo(nq * Dp), qgroup(nq * 8), sigma(nq),
        sc(nq * kv_len), va(kv_len * 8), vzi(kv_len * 8), pairs((kv_len + 1) / 2 * 8), out(Dp) {}

  void tables(const int32_t* kgs, const int32_t* vgs) {
    channel_groups(kgs, Gk, gk.p);
    channel_groups(vgs, Gv, gv.p);
    for (int64_t r = 0; r < runs; ++r)
      for (int e = 0; e < 2; ++e)
        for (int i = 0; i < 8; ++i) lane_k[(2 * r + e) * 8 + i] = gk[16 * r + 2 * i + e];
    for (int64_t c = 0; c < chunks; ++c)
      for (int i = 0; i < 8; ++i)
        for (int l = 0; l < 8; ++l)
          lane_v[(c * 8 + i) * 8 + l] = gv[64 * c + 16 * (i / 2) + 8 * (l / 4) + 4 * (i % 2) + l % 4];
  }

  // q̂ of each query (q' = q·scaling on its symmetric int16 grid), split into its even and odd channels, and Q_g
  void queries(const float* const* qrows, float scaling) {
    for (int64_t j = 0; j < nq; ++j) {
      float top = 0.f;
      for (int64_t d = 0; d < D; ++d) top = std::fmax(top, std::fabs(qrows[j][d] * scaling));
      sigma[j] = top / float(kQ16Max);
      const float inv = top > 0.f ? 1.0f / sigma[j] : 0.f, lim = float(kQ16Max);
      float* qg = qgroup.p + j * 8;
      for (int g = 0; g < 8; ++g) qg[g] = 0.f;
      for (int64_t d = 0; d < Dp; ++d) {
        const float v = d < D ? std::fmin(std::fmax(std::nearbyint(qrows[j][d] * scaling * inv), -lim), lim) : 0.f;
        qe[j * Dp + d] = d % 2 ? 0 : int16_t(v);
        qo[j * Dp + d] = d % 2 ? int16_t(v) : 0;
        qg[gk[d]] += v;
      }
    }
  }

  // sc[j][s] for every query and K row, eight rows at a time (their sums reduced together)
  template <int BITS>
  void scores(const uint8_t* kb, const uint16_t* ks, const uint8_t* kz) {
    constexpr int64_t cb = 2 * block_bytes(BITS);
    const Q16Decode<BITS> dec;
    for (int64_t s0 = 0; s0 < kv_len; s0 += 8) {
      const int64_t rows = kv_len - s0 < 8 ? kv_len - s0 : 8;
      const uint8_t* tile = kb + s0 * rb;
      prefetch_lines(tile + kPrefetchKv * rb, rows * rb);
      alignas(32) float ga[8][8], gaz[8][8];  // the rows' grids: a and a·z
      for (int64_t r = 0; r < rows; ++r) {
        __m256 a, az;
        token_grid(ks + (s0 + r) * Gk, kz + (s0 + r) * Gk, Gk, (S - s0 - r) * Gk >= 8, &a, &az);
        _mm256_store_ps(ga[r], a);
        _mm256_store_ps(gaz[r], az);
      }
      for (int64_t j = 0; j < nq; ++j) {
        const __m256 qg = _mm256_loadu_ps(qgroup.p + j * 8);
        const int16_t* qej = qe.p + j * Dp;
        const int16_t* qoj = qo.p + j * Dp;
        __m256 acc[8];
#pragma GCC unroll 8
        for (int r = 0; r < 8; ++r) {
          acc[r] = _mm256_setzero_ps();
          if (r >= rows) continue;
          const uint8_t* row = tile + r * rb;
          const __m256 a = _mm256_load_ps(ga[r]);
          __m256 odd = _mm256_setzero_ps();
          acc[r] = _mm256_fnmadd_ps(_mm256_load_ps(gaz[r]), qg, acc[r]);  // − Σ_g a·z·Q_g
          for (int64_t c = 0; c < chunks; ++c) {
            const int64_t at = c * cb;
            __m256i w[4];
            dec(row + at, at + cb <= rb ? row + at + cb / 2 : kZeroBlock, w);
#pragma GCC unroll 4
            for (int h = 0; h < 4; ++h) {
              const int64_t run = 4 * c + h;
              const __m256i e = _mm256_madd_epi16(w[h], load_words(qej + 16 * run));
              const __m256i o = _mm256_madd_epi16(w[h], load_words(qoj + 16 * run));
              const __m256 ae = _mm256_permutevar8x32_ps(a, load_lanes(lane_k.p + 16 * run));
              const __m256 ao = _mm256_permutevar8x32_ps(a, load_lanes(lane_k.p + 16 * run + 8));
              acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(e), ae, acc[r]);
              odd = _mm256_fmadd_ps(_mm256_cvtepi32_ps(o), ao, odd);
            }
          }
          acc[r] = _mm256_add_ps(acc[r], odd);
        }
        const __m256 v = _mm256_mul_ps(hsum8x8_ps(acc), _mm256_set1_ps(sigma[j]));
        mask_store8(sc.p + j * kv_len + s0, lanes_below(rows), v);
      }
    }
  }

  // V's grids, once for every query
  void value_grids(const uint16_t* vs, const uint8_t* vz) {
    for (int64_t s = 0; s < kv_len; ++s) {
      __m256 a;
      __m256i z;
      token_grid(vs + s * Gv, vz + s * Gv, Gv, (S - s) * Gv >= 8, &a, nullptr, &z);
      _mm256_store_ps(va.p + s * 8, a);
      _mm256_store_si256(reinterpret_cast<__m256i*>(vzi.p + s * 8), z);
    }
  }

  // Query j's weights: ŵ = round(p·a / step) per group (step = max_s p·a / 32767) into `pairs`, and Σ_s ŵ·z into
  // zsum (exact: int32 lanes over 128 rows, ≤ 128·32767·255 < 2^31, then int64); step per group into `step`
  void weights(const float* p, float (&step)[8], int64_t (&zsum)[8]) {
    __m256 top = _mm256_setzero_ps();
    for (int64_t s = 0; s < kv_len; ++s)
      top = _mm256_max_ps(top, _mm256_mul_ps(_mm256_set1_ps(p[s]), _mm256_load_ps(va.p + s * 8)));
    _mm256_storeu_ps(step, _mm256_div_ps(top, _mm256_set1_ps(float(kQ16Max))));
    alignas(32) float inv[8];
    for (int g = 0; g < 8; ++g) inv[g] = step[g] > 0.f ? 1.0f / step[g] : 0.f;
    const __m256 inv8 = _mm256_load_ps(inv), lim = _mm256_set1_ps(float(kQ16Max));
    for (int g = 0; g < 8; ++g) zsum[g] = 0;
    for (int64_t s0 = 0; s0 < kv_len; s0 += 128) {
      __m256i zacc = _mm256_setzero_si256();
      for (int64_t s = s0; s < s0 + 128 && s < kv_len; s += 2) {
        __m256i k[2];
        for (int h = 0; h < 2; ++h) {
          k[h] = _mm256_setzero_si256();  // past the last row: ŵ = 0
          if (s + h >= kv_len) continue;
          const __m256 w = _mm256_mul_ps(_mm256_set1_ps(p[s + h]), _mm256_load_ps(va.p + (s + h) * 8));
          const __m256 kf = _mm256_round_ps(_mm256_mul_ps(w, inv8), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          k[h] = _mm256_cvtps_epi32(_mm256_min_ps(kf, lim));
          zacc = _mm256_add_epi32(zacc, _mm256_mullo_epi32(k[h], load_lanes(vzi.p + (s + h) * 8)));
        }
        const __m256i both = _mm256_or_si256(k[0], _mm256_slli_epi32(k[1], 16));
        _mm256_store_si256(reinterpret_cast<__m256i*>(pairs.p + s / 2 * 8), both);
      }
      alignas(32) int32_t zt[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(zt), zacc);
      for (int g = 0; g < 8; ++g) zsum[g] += zt[g];
    }
  }

  // out[d] = Σ_s ŵ_{s,g(d)}·step_{g(d)}·c_sd for query j's pairs, a tile of 128 rows at a time (as the static path)
  template <int BITS>
  void pv(const uint8_t* vb, const float (&step)[8], bool prefetch) {
    constexpr int64_t cb = 2 * block_bytes(BITS);
    const Q16Decode<BITS> dec;
    for (int64_t d = 0; d < Dp; ++d) out[d] = 0.f;
    const __m256 step8 = _mm256_loadu_ps(step);
    for (int64_t s0 = 0; s0 < kv_len; s0 += 128) {
      const int64_t s1 = s0 + 128 < kv_len ? s0 + 128 : kv_len;
      for (int64_t c = 0; c < chunks; ++c) {
        const int32_t* lanes = lane_v.p + c * 64;  // accumulator i's lanes → their groups
        __m256i acc[8];
        pv_row_pairs(dec, vb, rb, c * cb, s0, s1, kv_len, prefetch && c == 0,
                     [&](int64_t s, __m256i (&pp)[8]) {
                       const __m256i by_group = load_lanes(pairs.p + s / 2 * 8);
                       for (int i = 0; i < 8; ++i)
                         pp[i] = _mm256_permutevar8x32_epi32(by_group, load_lanes(lanes + 8 * i));
                     }, acc);
        __m256 f[8];
        for (int i = 0; i < 8; ++i) f[i] = _mm256_permutevar8x32_ps(step8, load_lanes(lanes + 8 * i));
        add_pair_sums(out.p + c * kQ16Chunk, acc, f);
      }
    }
  }

  // n queries over the first `len` rows, query j seeing seen[j] of them (causal)
  template <int BITS>
  void attend(const float* const* qrows, float* const* orows, int64_t n, const int64_t* seen, int64_t len,
              const uint8_t* kb, const uint8_t* vb, const uint16_t* ks, const uint8_t* kz, const uint16_t* vs,
              const uint8_t* vz, float scaling, int p_bits) {
    nq = n;
    kv_len = len;
    queries(qrows, scaling);
    scores<BITS>(kb, ks, kz);
    value_grids(vs, vz);
    for (int64_t j = 0; j < nq; ++j) {
      float* p = sc.p + j * kv_len;
      softmax_row(p, seen[j], p_bits);
      for (int64_t s = seen[j]; s < kv_len; ++s) p[s] = 0.f;
      float step[8];
      int64_t zsum[8];
      weights(p, step, zsum);
      pv<BITS>(vb, step, j == 0);
      for (int64_t d = 0; d < D; ++d) orows[j][d] = out[d] - float(double(step[gv[d]]) * double(zsum[gv[d]]));
    }
  }

 private:
  void channel_groups(const int32_t* gs, int G, int32_t* gidx) const {
    int64_t d = 0;
    for (int g = 0; g < G; ++g)
      for (int64_t i = 0; i < gs[g]; ++i) gidx[d++] = g;
    for (; d < Dp; ++d) gidx[d] = 0;
  }
};

void token_attention(const float* q, int64_t B, int64_t Hq, int64_t Tq, int64_t D, const uint8_t* kp,
                     const uint8_t* vp, int64_t Hkv, int64_t S, const uint16_t* k_scale, const uint8_t* k_zero,
                     const uint16_t* v_scale, const uint8_t* v_zero, const int32_t* k_groups, int64_t Gk,
                     const int32_t* v_groups, int64_t Gv, int bits, int64_t kv_len, float scaling, int p_bits,
                     float* out) {
  if (Gk > kTokenMaxGroups || Gv > kTokenMaxGroups)
    return g_kv_token_attention(q, B, Hq, Tq, D, kp, vp, Hkv, S, k_scale, k_zero, v_scale, v_zero, k_groups, Gk,
                                v_groups, Gv, bits, kv_len, scaling, p_bits, out);
  const int64_t rb = row_bytes(D, bits), rep = Hq / Hkv, nq = rep * Tq, nb = nq < kQueryBlock ? nq : kQueryBlock;
#pragma omp parallel if (B * Hkv * kv_len * D > kParallelMin)
  {
    Buf<const float*> qrows(nb);
    Buf<float*> orows(nb);
    Buf<int64_t> seen(nb);
    TokenHead head(D, nb, S, kv_len, bits, int(Gk), int(Gv));
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * Hkv; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv, at = bh * S;
      head.tables(k_groups + h * Gk, v_groups + h * Gv);
      for (int64_t j0 = 0; j0 < nq; j0 += nb) {
        const int64_t n = nq - j0 < nb ? nq - j0 : nb;
        const int64_t len = query_block(q, out, b, h, Hq, rep, Tq, D, kv_len, j0, n, qrows.p, orows.p, seen.p);
        auto run = [&](auto bits_tag) {
          head.attend<decltype(bits_tag)::value>(qrows.p, orows.p, n, seen.p, len, kp + at * rb, vp + at * rb,
                                                 k_scale + at * Gk, k_zero + at * Gk, v_scale + at * Gv,
                                                 v_zero + at * Gv, scaling, p_bits);
        };
        switch (bits) {
          case 2: run(Int<2>{}); break;
          case 3: run(Int<3>{}); break;
          case 4: run(Int<4>{}); break;
          default: run(Int<8>{});
        }
      }
    }
  }
}

}  // namespace
}  // namespace avx2
}  // namespace rptq_cpu
#pragma GCC pop_options

namespace rptq_cpu {
void fill_avx2(KernelTable* t) {
  avx2::fill_generic(t);
  t->linear_a16 = avx2::v_linear_a16;
  t->gemv_aq = avx2::use_q16_gemv() ? avx2::q16_gemv : nullptr;  // linear_aq's grids are never null
  t->linear_aq = avx2::int_gemm_drive<avx2::IntGemm>;
  t->dequant_weight = avx2::v_dequant_weight;
  t->decode_attention = avx2::simd_decode_attention<avx2::Attention>;
  t->kv_token_attention = avx2::token_attention;
  t->isa = "avx2";
}
}  // namespace rptq_cpu
