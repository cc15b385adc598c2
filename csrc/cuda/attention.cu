// rptq::decode_attention on CUDA: softmax(q kᵀ · scaling) v over a packed (block_q{bits}) KV cache,
// flash-decoding style: the cached positions are cut into splits, one block per (split, query vector);
// a second small kernel merges the splits. The fp K/V are never materialized: codes are dequantized
// in registers, with the per-channel scale of K folded into q once:
//     q·k = Σ_d q_d (c_d - z_d) s_d = Σ_d qs_d c_d - Σ_d qs_d z_d,     qs_d = q_d s_d · scaling
//     Σ_p p_p v_pd = s_d (Σ_p p_p c_pd - z_d Σ_p p_p)
// so the inner loops are code × float FMAs. Codes become floats with the 2^23 magic number
// (bits | 0x4B000000 is the float 2^23 + c), which avoids the quarter-rate int→float conversion.
//
// Fast path: 4-bit codes and D ∈ {32, 64, 128, 256} (D/32 threads per position, one 16-byte block
// each). General path: any bit width / D, one thread per position for scores and per channel for V.
//
// Softmax: p_bits ≥ 16 uses the online (max, sum) merge of flash-decoding. p_bits < 16 needs the final
// max and sum before P can be rounded to its fixed grid, so it runs two passes: the first computes only
// the per-split (max, sum), the merge gives the global ones, the second rounds P and accumulates V.
#include "common.cuh"

#include <cfloat>

namespace rptq_cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kCombineThreads = 128;
constexpr int kWavesPerSm = 4;       // split blocks per multiprocessor a decode step aims for
constexpr int64_t kMinSplitLen = 64;   // positions a split block handles at least (and the rounding unit)
constexpr int64_t kMaxSplitLen = 1024; // and at most: the scores of a split live in shared memory
enum Mode { kOnline = 0, kStats = 1, kFixed = 2 };

__device__ __forceinline__ float nib(uint32_t w, int shift) {
  return __uint_as_float(((w >> shift) & 0xFu) | 0x4B000000u) - 8388608.f;
}

// Σ_j qreg[j] * code_j over one block_q4 (32 codes; word i: low nibbles 4i..4i+3, high 16+4i..).
__device__ __forceinline__ float block_dot_q4(const uint4& w, const float (&qreg)[32]) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  float a0 = 0.f, a1 = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      a0 = fmaf(qreg[4 * i + b], nib(words[i], 8 * b), a0);
      a1 = fmaf(qreg[16 + 4 * i + b], nib(words[i], 8 * b + 4), a1);
    }
  }
  return a0 + a1;
}

__device__ __forceinline__ void block_axpy_q4(const uint4& w, float p, float (&acc)[32]) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      acc[4 * i + b] = fmaf(p, nib(words[i], 8 * b), acc[4 * i + b]);
      acc[16 + 4 * i + b] = fmaf(p, nib(words[i], 8 * b + 4), acc[16 + 4 * i + b]);
    }
  }
}

__device__ float block_reduce(float v, float* red, bool is_max) {
  v = is_max ? warp_max(v) : warp_sum(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = red[0];
  for (int w = 1; w < (int)(blockDim.x >> 5); ++w) r = is_max ? fmaxf(r, red[w]) : r + red[w];
  return r;
}

struct Params {
  const void* q;
  const uint8_t* kc;
  const uint8_t* vc;
  const float* k_scale;
  const int* k_zero;
  const float* v_scale;
  const int* v_zero;
  int B, Hq, Hkv, Tq, S, D, bits, kv_len, split_len, nsplit;
  float scaling, levels;
  const float* stats;  // [BHT][2] global (max, sum) for kFixed
  float* part_o;       // [nsplit][BHT][D]
  float* part_m;       // [nsplit][BHT]
  float* part_l;       // [nsplit][BHT]
};

// grid: (nsplit, Hq * Tq, B). TPP: threads per position (fast path: D / 32; general: 1).
template <typename T, int TPP, bool kFast, int kMode>
__global__ void __launch_bounds__(kThreads) attn_split_kernel(Params P) {
  extern __shared__ float smem[];
  const int D = P.D;
  float* qs = smem;                        // [D]
  float* red = qs + D;                     // [32]
  float* scores = red + 32;                // [split_len]
  float* vsum = scores + P.split_len;      // [kThreads/32][D] (fast path)

  const int split = blockIdx.x, qi = blockIdx.y, b = blockIdx.z;
  const int hq = qi / P.Tq, tq = qi % P.Tq;
  const int hkv = hq / (P.Hq / P.Hkv);
  const int bht = (b * P.Hq + hq) * P.Tq + tq;
  const int end = P.kv_len - P.Tq + tq + 1;  // causal: positions < end are visible
  const int s0 = split * P.split_len;
  const int n = max(0, min(s0 + P.split_len, end) - s0);
  const int64_t out_idx = (int64_t)split * gridDim.y * gridDim.z + bht;

  if (n == 0) {  // a split past this query's causal horizon contributes nothing
    if (kMode != kFixed) {
      if (threadIdx.x == 0) { P.part_m[out_idx] = -INFINITY; P.part_l[out_idx] = 0.f; }
    }
    if (kMode != kStats)
      for (int d = threadIdx.x; d < D; d += blockDim.x) P.part_o[out_idx * D + d] = 0.f;
    return;
  }

  const T* q = static_cast<const T*>(P.q) + (int64_t)bht * D;
  const float* ks = P.k_scale + hkv * D;
  const int* kz = P.k_zero + hkv * D;
  float qz = 0.f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    const float v = to_float(q[d]) * ks[d] * P.scaling;
    qs[d] = v;
    qz += v * static_cast<float>(kz[d]);
  }
  qz = block_reduce(qz, red, false);  // also the barrier that publishes qs

  const int64_t rb = row_bytes(D, P.bits);
  const int64_t head_row0 = ((int64_t)b * P.Hkv + hkv) * P.S + s0;  // first row of this split
  const uint8_t* krows = P.kc + head_row0 * rb;
  const uint8_t* vrows = P.vc + head_row0 * rb;

  // ---- scores ----
  if constexpr (kFast) {
    constexpr int kPosPerIter = kThreads / TPP;
    const int j = threadIdx.x % TPP;  // this thread's 32-channel block
    float qreg[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) qreg[i] = qs[32 * j + i];
    // The loop bound is block-uniform: every lane reaches the shuffles below.
    for (int base = 0; base < n; base += 4 * kPosPerIter) {
      const int p0 = base + threadIdx.x / TPP;
      uint4 w[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int p = p0 + u * kPosPerIter;
        w[u] = p < n ? __ldg(reinterpret_cast<const uint4*>(krows + (int64_t)p * rb) + j) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int p = p0 + u * kPosPerIter;
        float s = block_dot_q4(w[u], qreg);
#pragma unroll
        for (int off = 1; off < TPP; off <<= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (j == 0 && p < n) scores[p] = s - qz;
      }
    }
  } else {
    for (int p = threadIdx.x; p < n; p += blockDim.x) {
      const uint8_t* row = krows + (int64_t)p * rb;
      float s = 0.f;
      for (int d = 0; d < D; ++d) s = fmaf(qs[d], static_cast<float>(get_code(row, d, P.bits)), s);
      scores[p] = s - qz;
    }
  }
  __syncthreads();

  // ---- softmax weights of this split ----
  float m = 0.f;
  if (kMode != kFixed) {
    float lm = -INFINITY;
    for (int p = threadIdx.x; p < n; p += blockDim.x) lm = fmaxf(lm, scores[p]);
    m = block_reduce(lm, red, true);
  }
  float gmax = 0.f, ginv = 0.f;
  if (kMode == kFixed) {
    gmax = P.stats[2 * bht];
    ginv = 1.f / P.stats[2 * bht + 1];
  }
  float ls = 0.f;
  for (int p = threadIdx.x; p < n; p += blockDim.x) {
    float e;
    if (kMode == kFixed) {
      e = rintf(expf(scores[p] - gmax) * ginv * P.levels) / P.levels;  // P on its fixed grid
    } else {
      e = expf(scores[p] - m);
    }
    scores[p] = e;
    ls += e;
  }
  const float l = block_reduce(ls, red, false);  // also publishes scores
  if (kMode == kStats) {
    if (threadIdx.x == 0) { P.part_m[out_idx] = m; P.part_l[out_idx] = l; }
    return;
  }

  // ---- P · V ----
  const float* vs = P.v_scale + hkv * D;
  const int* vz = P.v_zero + hkv * D;
  float* po = P.part_o + out_idx * D;
  if constexpr (kFast) {
    constexpr int kPosPerIter = kThreads / TPP;
    const int j = threadIdx.x % TPP;
    float acc[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) acc[i] = 0.f;
    for (int base = 0; base < n; base += 4 * kPosPerIter) {
      const int p0 = base + threadIdx.x / TPP;
      uint4 w[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int p = p0 + u * kPosPerIter;
        w[u] = p < n ? __ldg(reinterpret_cast<const uint4*>(vrows + (int64_t)p * rb) + j) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int p = p0 + u * kPosPerIter;
        block_axpy_q4(w[u], p < n ? scores[p] : 0.f, acc);
      }
    }
    // lanes with the same j (lane % TPP) hold partial sums of the same channels: reduce in the warp,
    // then across the warps through shared memory
#pragma unroll
    for (int i = 0; i < 32; ++i) {
#pragma unroll
      for (int off = TPP; off < 32; off <<= 1) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane < TPP) {
#pragma unroll
      for (int i = 0; i < 32; ++i) vsum[warp * D + 32 * lane + i] = acc[i];
    }
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
      float s = 0.f;
      for (int w2 = 0; w2 < kThreads / 32; ++w2) s += vsum[w2 * D + d];
      po[d] = vs[d] * (s - static_cast<float>(vz[d]) * l);
    }
  } else {
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
      float s = 0.f;
      for (int p = 0; p < n; ++p) s = fmaf(scores[p], static_cast<float>(get_code(vrows + (int64_t)p * rb, d, P.bits)), s);
      po[d] = vs[d] * (s - static_cast<float>(vz[d]) * l);
    }
  }
  if (threadIdx.x == 0) {
    P.part_m[out_idx] = kMode == kFixed ? 0.f : m;
    P.part_l[out_idx] = l;
  }
}

// grid: B*Hq*Tq blocks. kOnline: out = Σ_s o_s e^{m_s - M} / Σ_s l_s e^{m_s - M};
// kStats: writes (M, L); kFixed: out = Σ_s o_s (P was already normalized).
template <typename T, int kMode>
__global__ void attn_combine_kernel(const float* __restrict__ part_o, const float* __restrict__ part_m,
                                    const float* __restrict__ part_l, int nsplit, int bht_total, int D,
                                    float* __restrict__ stats, T* __restrict__ out) {
  const int bht = blockIdx.x;
  float M = -INFINITY;
  if (kMode != kFixed)
    for (int s = 0; s < nsplit; ++s) M = fmaxf(M, part_m[(int64_t)s * bht_total + bht]);
  float L = 0.f;
  if (kMode != kFixed)
    for (int s = 0; s < nsplit; ++s) {
      const float l = part_l[(int64_t)s * bht_total + bht];
      if (l > 0.f) L += l * expf(part_m[(int64_t)s * bht_total + bht] - M);
    }
  if constexpr (kMode == kStats) {
    if (threadIdx.x == 0) { stats[2 * bht] = M; stats[2 * bht + 1] = L; }
  } else {
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
      float acc = 0.f;
      for (int s = 0; s < nsplit; ++s) {
        const int64_t idx = (int64_t)s * bht_total + bht;
        const float o = part_o[idx * D + d];
        if (kMode == kFixed) acc += o;
      else if (part_l[idx] > 0.f) acc += o * expf(part_m[idx] - M);
      }
      out[(int64_t)bht * D + d] = from_float<T>(kMode == kFixed ? acc : acc / L);
    }
  }
}

template <typename T, int TPP, bool kFast, int kMode>
void launch_split(const Params& P, dim3 grid, size_t smem) {
  auto kernel = attn_split_kernel<T, TPP, kFast, kMode>;
  ensure_smem<attn_split_kernel<T, TPP, kFast, kMode>>(smem);
  kernel<<<grid, kThreads, smem, current_stream()>>>(P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kMode>
void launch_split_dispatch(const Params& P, dim3 grid, size_t smem) {
  const bool fast = P.bits == 4 && P.D % 32 == 0;
  const int tpp = P.D / 32;
  if (fast && tpp == 4) launch_split<T, 4, true, kMode>(P, grid, smem);
  else if (fast && tpp == 2) launch_split<T, 2, true, kMode>(P, grid, smem);
  else if (fast && tpp == 1) launch_split<T, 1, true, kMode>(P, grid, smem);
  else if (fast && tpp == 8) launch_split<T, 8, true, kMode>(P, grid, smem);
  else launch_split<T, 1, false, kMode>(P, grid, smem);
}

}  // namespace

at::Tensor decode_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                 const at::Tensor& k_scale_in, const at::Tensor& k_zero_in,
                                 const at::Tensor& v_scale_in, const at::Tensor& v_zero_in, int64_t bits,
                                 int64_t kv_len, double scaling, int64_t p_bits) {
  rptq_checks::check_decode_attention(q_in, k_in, v_in, k_scale_in, k_zero_in, v_scale_in, v_zero_in, bits, kv_len,
                                      p_bits);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor kc = k_in.contiguous();
  const at::Tensor vc = v_in.contiguous();
  const int B = (int)q.size(0), Hq = (int)q.size(1), Tq = (int)q.size(2), D = (int)q.size(3);
  const int Hkv = (int)kc.size(1), S = (int)kc.size(2);
  const auto f32 = [&](const at::Tensor& t) { return t.to(q.device(), at::kFloat).contiguous(); };
  const auto i32 = [&](const at::Tensor& t) { return t.to(q.device(), at::kInt).contiguous(); };
  const at::Tensor k_scale = f32(k_scale_in), v_scale = f32(v_scale_in);
  const at::Tensor k_zero = i32(k_zero_in), v_zero = i32(v_zero_in);
  at::Tensor out = at::empty_like(q);
  const int bht = B * Hq * Tq;
  if (bht == 0 || D == 0) return out;

  // Split length: enough blocks to fill the GPU kWavesPerSm times, kMinSplitLen..kMaxSplitLen positions a block
  // (a multiple of kMinSplitLen).
  const int64_t want_splits = ceil_div(kWavesPerSm * device_limits(q.get_device()).sms, bht);
  const int split_len = (int)std::min<int64_t>(
      kMaxSplitLen, std::max<int64_t>(kMinSplitLen, ceil_div(ceil_div(kv_len, want_splits), kMinSplitLen) * kMinSplitLen));
  const int nsplit = (int)ceil_div(kv_len, split_len);

  auto fopt = q.options().dtype(at::kFloat);
  at::Tensor part_o = at::empty({nsplit, bht, D}, fopt);
  at::Tensor part_m = at::empty({nsplit, bht}, fopt);
  at::Tensor part_l = at::empty({nsplit, bht}, fopt);
  Params P{};
  P.q = q.data_ptr();
  P.kc = kc.data_ptr<uint8_t>();
  P.vc = vc.data_ptr<uint8_t>();
  P.k_scale = k_scale.data_ptr<float>();
  P.k_zero = k_zero.data_ptr<int>();
  P.v_scale = v_scale.data_ptr<float>();
  P.v_zero = v_zero.data_ptr<int>();
  P.B = B; P.Hq = Hq; P.Hkv = Hkv; P.Tq = Tq; P.S = S; P.D = D; P.bits = (int)bits; P.kv_len = (int)kv_len;
  P.split_len = split_len; P.nsplit = nsplit;
  P.scaling = static_cast<float>(scaling);
  P.levels = static_cast<float>((1 << std::min<int64_t>(p_bits, rptq_checks::kFloatBits)) - 1);
  P.part_o = part_o.data_ptr<float>();
  P.part_m = part_m.data_ptr<float>();
  P.part_l = part_l.data_ptr<float>();
  const dim3 grid(nsplit, Hq * Tq, B);
  const size_t smem = sizeof(float) * (D + 32 + split_len + (kThreads / 32) * D);
  const auto stream = current_stream();
  const int cthreads = kCombineThreads;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rptq_decode_attention", [&] {
    using T = scalar_t;
    if (p_bits >= rptq_checks::kFloatBits) {  // P stays in floating point
      launch_split_dispatch<T, kOnline>(P, grid, smem);
      attn_combine_kernel<T, kOnline><<<bht, cthreads, 0, stream>>>(P.part_o, P.part_m, P.part_l, nsplit, bht, D,
                                                                    nullptr, out.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      at::Tensor stats = at::empty({bht, 2}, fopt);
      launch_split_dispatch<T, kStats>(P, grid, smem);
      attn_combine_kernel<T, kStats><<<bht, 32, 0, stream>>>(P.part_o, P.part_m, P.part_l, nsplit, bht, D,
                                                             stats.data_ptr<float>(), nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      P.stats = stats.data_ptr<float>();
      launch_split_dispatch<T, kFixed>(P, grid, smem);
      attn_combine_kernel<T, kFixed><<<bht, cthreads, 0, stream>>>(P.part_o, P.part_m, P.part_l, nsplit, bht, D,
                                                                   nullptr, out.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(rptq, CUDA, m) { m.impl("decode_attention", &decode_attention_cuda); }

}  // namespace rptq_cuda
