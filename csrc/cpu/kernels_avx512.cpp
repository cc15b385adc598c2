// AVX-512 (F/BW/VL + VNNI) kernels. The portable kernels are compiled for this ISA too; the hot ops
// are replaced below with intrinsics.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <omp.h>

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
    const uint8_t* blk = row + (c >> 1) * (4 * BITS);
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

// A group's run of 16-lane chunks; a chunk that straddles two groups appears in both, with the
// activation lanes outside the group zeroed (so every group/row layout is exact, no padding needed).
struct Segments {
  int64_t n = 0;
  int64_t* chunk = nullptr;   // [n] chunk index
  uint16_t* mask = nullptr;   // [n] lanes inside the group
  int64_t* first = nullptr;   // [G + 1] first segment of group g
  ~Segments() {
    std::free(chunk);
    std::free(mask);
    std::free(first);
  }
  // lanes = chunk width (16 floats, or 4 bytes for the VNNI k-steps)
  void build(const int32_t* gs, int G, int lanes) {
    first = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * (G + 1)));
    int64_t cnt = 0, s = 0;
    for (int g = 0; g < G; ++g) {
      const int64_t e = s + gs[g];
      cnt += (e - 1) / lanes - s / lanes + 1;
      s = e;
    }
    chunk = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * (cnt + 1)));
    mask = static_cast<uint16_t*>(std::malloc(sizeof(uint16_t) * (cnt + 1)));
    s = 0;
    n = 0;
    for (int g = 0; g < G; ++g) {
      const int64_t e = s + gs[g];
      first[g] = n;
      for (int64_t c = s / lanes; c <= (e - 1) / lanes; ++c) {
        const int64_t lo = imax(s, c * lanes) - c * lanes, hi = imin(e, (c + 1) * lanes) - c * lanes;
        chunk[n] = c;
        mask[n] = uint16_t(((1u << hi) - 1u) & ~((1u << lo) - 1u));
        ++n;
      }
      s = e;
    }
    first[G] = n;
  }
};

// ---- W{2,3,4,8}A16 GEMV (M ≤ 8 rows) ---------------------------------------------------------------
// y[m, n] = Σ_g scale[n,g] · (Σ_{k∈g} code[n,k] x[m,k] − zero[n,g] Σ_{k∈g} x[m,k]): the codes are
// converted to float in registers and multiplied with the group-masked activations; the zero-point
// enters once per group through the activation sums.
template <int M, int BITS>
void gemv_rows(const float* xs, const Segments& sg, const float* xsum, const uint8_t* qw, int64_t rb,
               const float* scales, const uint8_t* zeros, int G, int64_t n0, int64_t n1, int64_t N,
               const float* bias, float* y) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = qw + n * rb;
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
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
      for (int64_t s = sg.first[g]; s < sg.first[g + 1]; ++s) {
        const __m512 w = unpack16_ps<BITS>(row, sg.chunk[s]);
        const float* xv = xs + s * 16 * M;
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(w, _mm512_load_ps(xv + 16 * m), acc[m]);
      }
      const __m512 sv = _mm512_set1_ps(sc[g]);
      const float sz = sc[g] * float(zr[g]);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        tot[m] = _mm512_fmadd_ps(acc[m], sv, tot[m]);
        corr[m] += sz * xsum[m * G + g];
      }
    }
    const float b = bias ? bias[n] : 0.f;
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) y[m * N + n] = hsum(tot[m]) - corr[m] + b;
  }
}

template <int M, int BITS>
void gemv(const float* xs, const Segments& sg, const float* xsum, const uint8_t* qw, int64_t rb, const float* scales,
          const uint8_t* zeros, int G, int64_t N, const float* bias, float* y) {
#pragma omp parallel
  {
    const int nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t per = (N + nt - 1) / nt;
    const int64_t n0 = imin(N, t * per), n1 = imin(N, n0 + per);
    gemv_rows<M, BITS>(xs, sg, xsum, qw, rb, scales, zeros, G, n0, n1, N, bias, y);
  }
}

template <int BITS>
void gemv_m(int M, const float* xs, const Segments& sg, const float* xsum, const uint8_t* qw, int64_t rb,
            const float* scales, const uint8_t* zeros, int G, int64_t N, const float* bias, float* y) {
  switch (M) {
    case 1: return gemv<1, BITS>(xs, sg, xsum, qw, rb, scales, zeros, G, N, bias, y);
    case 2: return gemv<2, BITS>(xs, sg, xsum, qw, rb, scales, zeros, G, N, bias, y);
    case 3: return gemv<3, BITS>(xs, sg, xsum, qw, rb, scales, zeros, G, N, bias, y);
    case 4: return gemv<4, BITS>(xs, sg, xsum, qw, rb, scales, zeros, G, N, bias, y);
    case 5: return gemv<5, BITS>(xs, sg, xsum, qw, rb, scales, zeros, G, N, bias, y);
    case 6: return gemv<6, BITS>(xs, sg, xsum, qw, rb, scales, zeros, G, N, bias, y);
    case 7: return gemv<7, BITS>(xs, sg, xsum, qw, rb, scales, zeros, G, N, bias, y);
    default: return gemv<8, BITS>(xs, sg, xsum, qw, rb, scales, zeros, G, N, bias, y);
  }
}

void v_linear_a16(const float* x, int64_t M, const uint8_t* qw, const float* scales, const uint8_t* zeros,
                  const int32_t* gs, int G, int64_t N, int64_t K, int bits, const float* bias, float* y) {
  if (M > 8 || M < 1 || K < 1) return g_linear_a16(x, M, qw, scales, zeros, gs, G, N, K, bits, bias, y);
  Segments sg;
  sg.build(gs, G, 16);
  // masked activations, segment-major: xs[s][m][16]
  Buf<float> xs(sg.n * 16 * M);
  Buf<float> xsum(M * G);
  for (int g = 0; g < G; ++g) {
    for (int64_t m = 0; m < M; ++m) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t s = sg.first[g]; s < sg.first[g + 1]; ++s) {
        const int64_t c = sg.chunk[s];
        const int64_t valid = imin(16, K - c * 16);  // lanes that exist in x
        const __mmask16 mk = __mmask16(sg.mask[s] & ((1u << valid) - 1u));
        const __m512 v = _mm512_maskz_loadu_ps(mk, x + m * K + c * 16);
        _mm512_store_ps(xs.p + (s * M + m) * 16, v);
        acc = _mm512_add_ps(acc, v);
      }
      xsum[m * G + g] = hsum(acc);
    }
  }
  const int64_t rb = row_bytes(K, bits);
  switch (bits) {
    case 2: return gemv_m<2>(int(M), xs.p, sg, xsum.p, qw, rb, scales, zeros, G, N, bias, y);
    case 3: return gemv_m<3>(int(M), xs.p, sg, xsum.p, qw, rb, scales, zeros, G, N, bias, y);
    case 4: return gemv_m<4>(int(M), xs.p, sg, xsum.p, qw, rb, scales, zeros, G, N, bias, y);
    default: return gemv_m<8>(int(M), xs.p, sg, xsum.p, qw, rb, scales, zeros, G, N, bias, y);
  }
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

struct AqTile {
  uint32_t* wt;   // [K4][64]
  int32_t* zw;    // [G][64]
  int32_t* kc;    // [G][64]  za·Σc − L·za·zw
  float* sc;      // [G][64]  act_scale·scale
};

template <int MB>
void aq_micro(const uint32_t* aw, const int32_t* asum, const Segments& sg, int G, const AqTile& t, float* facc) {
  // aw: [seg][MB] activation words of these rows; asum: [MB][G]; facc: [MB][64] float accumulators
  for (int g = 0; g < G; ++g) {
    __m512i acc[MB][4];
#pragma GCC unroll 6
    for (int r = 0; r < MB; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_si512();
    for (int64_t s = sg.first[g]; s < sg.first[g + 1]; ++s) {
      const uint32_t* wrow = t.wt + sg.chunk[s] * kNT;
      const __m512i w0 = _mm512_load_si512(wrow), w1 = _mm512_load_si512(wrow + 16);
      const __m512i w2 = _mm512_load_si512(wrow + 32), w3 = _mm512_load_si512(wrow + 48);
      const uint32_t* a = aw + s * MB;
#pragma GCC unroll 6
      for (int r = 0; r < MB; ++r) {
        const __m512i av = _mm512_set1_epi32(int32_t(a[r]));
        acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], av, w0);
        acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], av, w1);
        acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], av, w2);
        acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], av, w3);
      }
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512i zw = _mm512_load_si512(t.zw + g * kNT + 16 * j);
      const __m512i kc = _mm512_load_si512(t.kc + g * kNT + 16 * j);
      const __m512 sc = _mm512_load_ps(t.sc + g * kNT + 16 * j);
#pragma GCC unroll 6
      for (int r = 0; r < MB; ++r) {
        __m512i d = _mm512_sub_epi32(acc[r][j], _mm512_mullo_epi32(zw, _mm512_set1_epi32(asum[r * G + g])));
        d = _mm512_sub_epi32(d, kc);
        float* f = facc + r * kNT + 16 * j;
        _mm512_store_ps(f, _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, _mm512_load_ps(f)));
      }
    }
  }
}

void v_linear_aq(const float* x, int64_t M, const uint8_t* qw, const float* scales, const uint8_t* zeros,
                 const int32_t* gs, int G, int64_t N, int64_t K, int bits, const float* act_scale,
                 const int32_t* act_zero, int act_bits, const float* bias, float* y) {
  if (bits > 4 || M < 1 || K < 1 || N < 1)  // 8-bit codes are no s8 operand: portable path
    return g_linear_aq(x, M, qw, scales, zeros, gs, G, N, K, bits, act_scale, act_zero, act_bits, bias, y);
  Buf<int64_t> off(G + 1);
  group_offsets(gs, G, off.p);
  Segments sg;
  sg.build(gs, G, 4);
  const int64_t K4 = (K + 3) / 4, ns = sg.n;
  const int64_t nmb = (M + kMB - 1) / kMB;
  // activation codes, then per-micro-tile words aw[mb][seg][kMB] and sums asum[mb][kMB][G]
  Buf<uint8_t> a(M * K4 * 4);
  Buf<uint32_t> aw(nmb * ns * kMB);
  Buf<int32_t> asum(nmb * kMB * G);
  const int qmax = (1 << act_bits) - 1;
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    uint8_t* am = a.p + m * K4 * 4;
    for (int g = 0; g < G; ++g) {
      const float inv = 1.0f / act_scale[g];
      const int32_t z = act_zero[g];
      int32_t sum = 0;
      for (int64_t k = off[g]; k < off[g + 1]; ++k) {
        am[k] = quantize_one(x[m * K + k], inv, z, qmax);
        sum += am[k];
      }
      asum[((m / kMB) * kMB + m % kMB) * G + g] = sum;
    }
    for (int64_t k = K; k < K4 * 4; ++k) am[k] = 0;
    const uint32_t* a32 = reinterpret_cast<const uint32_t*>(am);
    uint32_t* dst = aw.p + (m / kMB) * ns * kMB + m % kMB;
    for (int64_t s = 0; s < ns; ++s) {
      const uint16_t mk = sg.mask[s];
      const uint32_t bytes = (mk & 1 ? 0xFFu : 0u) | (mk & 2 ? 0xFF00u : 0u) | (mk & 4 ? 0xFF0000u : 0u) |
                             (mk & 8 ? 0xFF000000u : 0u);
      dst[s * kMB] = a32[sg.chunk[s]] & bytes;
    }
  }
  for (int64_t m = M; m < nmb * kMB; ++m) {  // padding rows of the last micro-tile
    for (int64_t s = 0; s < ns; ++s) aw[(m / kMB) * ns * kMB + s * kMB + m % kMB] = 0;
    for (int g = 0; g < G; ++g) asum[m * G + g] = 0;
  }
  const int64_t rb = row_bytes(K, bits);
  const int64_t ntiles = (N + kNT - 1) / kNT;
#pragma omp parallel
  {
    Buf<uint32_t> wt(K4 * kNT);
    Buf<int32_t> zw(G * kNT), kc(G * kNT);
    Buf<float> sc(G * kNT);
    Buf<uint8_t> codes(K4 * 4);
    Buf<float> facc(kMB * kNT);
    AqTile t{wt.p, zw.p, kc.p, sc.p};
#pragma omp for schedule(dynamic, 1)
    for (int64_t tile = 0; tile < ntiles; ++tile) {
      const int64_t n0 = tile * kNT, nn = imin(kNT, N - n0);
      for (int64_t j = 0; j < kNT; ++j) {
        if (j >= nn) {
          for (int64_t k4 = 0; k4 < K4; ++k4) wt[k4 * kNT + j] = 0;
          for (int g = 0; g < G; ++g) zw[g * kNT + j] = kc[g * kNT + j] = 0, sc[g * kNT + j] = 0.f;
          continue;
        }
        const int64_t n = n0 + j;
        unpack_row(qw + n * rb, K, bits, codes.p);
        for (int64_t k = K; k < K4 * 4; ++k) codes[k] = 0;
        const uint32_t* c32 = reinterpret_cast<const uint32_t*>(codes.p);
        for (int64_t k4 = 0; k4 < K4; ++k4) wt[k4 * kNT + j] = c32[k4];
        for (int g = 0; g < G; ++g) {
          int32_t csum = 0;
          for (int64_t k = off[g]; k < off[g + 1]; ++k) csum += codes[k];
          const int32_t za = act_zero[g], z = zeros[n * G + g], len = int32_t(off[g + 1] - off[g]);
          zw[g * kNT + j] = z;
          kc[g * kNT + j] = za * csum - len * za * z;
          sc[g * kNT + j] = act_scale[g] * scales[n * G + g];
        }
      }
      for (int64_t mb = 0; mb < nmb; ++mb) {
        const int rows = int(imin(kMB, M - mb * kMB));
        for (int i = 0; i < kMB * kNT; ++i) facc[i] = 0.f;
        const uint32_t* awm = aw.p + mb * ns * kMB;
        const int32_t* asm_ = asum.p + mb * kMB * G;
        // MB = kMB always (padding rows are zero); the row count only limits the store
        aq_micro<kMB>(awm, asm_, sg, G, t, facc.p);
        for (int r = 0; r < rows; ++r)
          for (int64_t j = 0; j < nn; ++j)
            y[(mb * kMB + r) * N + n0 + j] = facc[r * kNT + j] + (bias ? bias[n0 + j] : 0.f);
      }
    }
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
  t->linear_aq = avx512::v_linear_aq;
  t->isa = "avx512vnni";
}
}  // namespace rptq_cpu
