// AVX2 + FMA kernels. The portable kernels are compiled for this ISA (GCC vectorizes them); the
// memory-bound decode ops (W·A16 GEMV, weight dequantization, decode attention) are replaced with
// intrinsics, 8 lanes wide. Only headers without AVX2-specific inline code come before the pragma.
#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

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

inline __m256 maskz_load8(const float* p, uint32_t mask) {
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int32_t(mask)), bits), bits);
  return _mm256_maskload_ps(p, m);
}

inline void mask_store8(float* p, uint32_t mask, __m256 v) {
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  _mm256_maskstore_ps(p, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int32_t(mask)), bits), bits), v);
}

// ---- W·A16 GEMV (≤ 8 rows): see kernels_avx512.cpp; here 8-lane chunks ---------------------------------
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

void v_linear_a16(const float* x, int64_t M, const uint8_t* qw, const float* scales, const uint8_t* zeros,
                  const int32_t* gs, int G, int64_t N, int64_t K, int bits, const float* bias, float* y) {
  if (M > kGemvMaxRows || M < 1 || K < 1) return g_linear_a16(x, M, qw, scales, zeros, gs, G, N, K, bits, bias, y);
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
  float m = -INFINITY;
  for (int64_t s = 0; s < len; ++s) m = sc[s] > m ? sc[s] : m;
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  int64_t s = 0;
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

  static void softmax_row(float* sc, int64_t len, int p_bits) { avx2::softmax_row(sc, len, p_bits); }

  template <int BITS>
  static void pv(const float* p, int64_t nq, int64_t kv_len, const uint8_t* vb, int64_t rb, int64_t C, float* acc) {
    for (int64_t i = 0; i < nq * C * 8; ++i) acc[i] = 0.f;
    for (int64_t s = 0; s < kv_len; ++s) {
      const uint8_t* row = vb + s * rb;
      if (s + kPrefetchKv < kv_len) _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchKv * rb), _MM_HINT_T0);
      for (int64_t c = 0; c < C; ++c) {
        const __m256 v = unpack8_ps<BITS>(row, c);
        for (int64_t j = 0; j < nq; ++j) {
          float* a = acc + (j * C + c) * 8;
          _mm256_store_ps(a, _mm256_fmadd_ps(_mm256_set1_ps(p[j * kv_len + s]), v, _mm256_load_ps(a)));
        }
      }
    }
  }
};

}  // namespace
}  // namespace avx2
}  // namespace rptq_cpu
#pragma GCC pop_options

namespace rptq_cpu {
void fill_avx2(KernelTable* t) {
  avx2::fill_generic(t);
  t->linear_a16 = avx2::v_linear_a16;
  t->dequant_weight = avx2::v_dequant_weight;
  t->decode_attention = avx2::simd_decode_attention<avx2::Attention>;
  t->isa = "avx2";
}
}  // namespace rptq_cpu
