// rptq::linear_a16 on CUDA: y = x @ W.T + bias with W[n, k] = (code - zeros[n, g(k)]) * scales[n, g(k)].
//
// Decode (≤ kGemvMaxRows rows of x, fp16, 3/4-bit, K % 32 == 0): a GEMV that reads the packed weight once, straight
// from pack.py's block_q4 / block_q3 layout. It is bound by the weight bytes, so the inner loop must stay
// cheap enough to keep up with ~4 TB/s:
//   * x is staged once per block in shared memory as fp16 scaled by 2^-8 (exact), stored in the order
//     the nibble decode produces codes, so one 16-byte shared load feeds four half2 FMAs;
//   * a 4-bit block is decoded with the fp16 magic-number trick: (nibbles & 0x000F000F) | 0x64006400 is
//     the half2 (1024 + c_a, 1024 + c_b); subtracting (1024 + zero) gives c - zero exactly;
//   * products are summed in fp16 16 at a time, one 32-code chunk (|c - z| ≤ 15 and |x·2^-8| ≤ 256 keep
//     16 of them under 65504: no overflow even for activations in the thousands), then in fp32 (one
//     half2→float2 conversion per chunk); the group scale multiplies each chunk's partial sum in fp32.
// Uneven groups (KMeans clusters such as 37, 81, 12 channels): a 32-code chunk that lies in one group
// takes the fast path; a chunk crossing a group boundary is summed once per group segment with the x
// values outside the segment masked to zero.
//
// Prefill (more rows), other bit widths, bf16/fp32 x: the weight is dequantized to x's dtype by one
// kernel and multiplied with cuBLAS (compute bound there, so the 2-byte weight is cheap next to the GEMM).
#include "common.cuh"

namespace rptq_cuda {
namespace {

constexpr int kWarps = 8;         // warps per GEMV block
constexpr int kRowsPerWarp = 2;   // output rows per warp: more independent loads in flight, x reused
constexpr int kUnroll = 4;        // chunks per lane loaded before any is used
constexpr float kXShift = 256.f;  // x is staged as x / 256 in fp16 (see the header comment)
static_assert(kGemvMaxRows == 8, "dispatch_gemv_m compiles the GEMV for 1, 2, 4 and 8 rows");

constexpr int kDequantThreads = 256;
constexpr int64_t kDequantMaxBlocks = 8192;  // a grid-stride loop covers the rest

// Slot of code j (0..31) of a chunk in the staged x: the order in which decode_pairs<4> emits codes.
// Word i of a block_q4 holds codes 4i..4i+3 (low nibbles) and 16+4i..16+4i+3 (high nibbles); the
// half2 pairs come out as (4i, 4i+2), (4i+1, 4i+3), (16+4i, 16+4i+2), (16+4i+1, 16+4i+3).
__host__ __device__ constexpr int x_slot(int j) {
  return 8 * ((j & 15) >> 2) + 4 * (j >> 4) + (((j & 1) << 1) | ((j >> 1) & 1));
}

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t mask, uint32_t orv) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(a), "r"(mask), "r"(orv));  // (a & mask) | orv
  return r;
}

__device__ __forceinline__ __half2 u32_as_half2(uint32_t v) { return *reinterpret_cast<__half2*>(&v); }

// One chunk (32 codes, 4-bit) against staged x: Σ_j (c_j - z) * x'_j over the slots where mask != 0.
template <bool kMasked>
__device__ __forceinline__ float chunk_dot_q4(const uint4& w, const uint4* xs, __half2 zh, int lo, int hi) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  __half2 acc = __float2half2_rn(0.f);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t v = words[i];
    const __half2 d0 = __hsub2(u32_as_half2(lop3_and_or(v, 0x000F000Fu, 0x64006400u)), zh);        // 4i, 4i+2
    const __half2 d1 = __hsub2(u32_as_half2(lop3_and_or(v >> 8, 0x000F000Fu, 0x64006400u)), zh);   // 4i+1, 4i+3
    const __half2 d2 = __hsub2(u32_as_half2(lop3_and_or(v >> 4, 0x000F000Fu, 0x64006400u)), zh);   // 16+4i, +2
    const __half2 d3 = __hsub2(u32_as_half2(lop3_and_or(v >> 12, 0x000F000Fu, 0x64006400u)), zh);  // 16+4i+1, +3
    const uint4 xv = xs[i];
    __half2 x0 = u32_as_half2(xv.x), x1 = u32_as_half2(xv.y), x2 = u32_as_half2(xv.z), x3 = u32_as_half2(xv.w);
    if (kMasked) {  // zero the x values outside [lo, hi): their products vanish exactly
      auto m2 = [&](int a, int b) {
        return __halves2half2(__float2half((a >= lo && a < hi) ? 1.f : 0.f), __float2half((b >= lo && b < hi) ? 1.f : 0.f));
      };
      x0 = __hmul2(x0, m2(4 * i, 4 * i + 2));
      x1 = __hmul2(x1, m2(4 * i + 1, 4 * i + 3));
      x2 = __hmul2(x2, m2(16 + 4 * i, 16 + 4 * i + 2));
      x3 = __hmul2(x3, m2(16 + 4 * i + 1, 16 + 4 * i + 3));
    }
    acc = __hfma2(d0, x0, acc);
    acc = __hfma2(d1, x1, acc);
    acc = __hfma2(d2, x2, acc);
    acc = __hfma2(d3, x3, acc);
  }
  // 16 products a lane, each |c - z| * |x / 256| ≤ 15 * 256: the fp16 sum stays under 65504
  const float2 f = __half22float2(acc);
  return f.x + f.y;
}

// One chunk of a 3-bit row (block_q3: 8 bytes of low 2-bit pairs, then a uint32 of third bits): float math.
template <bool kMasked>
__device__ __forceinline__ float chunk_dot_q3(const uint32_t (&w)[3], const __half* xs, float z, int lo, int hi) {
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const int b = j & 7;
    const uint32_t low = (w[b >> 2] >> (8 * (b & 3) + 2 * (j >> 3))) & 3u;
    const uint32_t code = low | (((w[2] >> j) & 1u) << 2);
    float xv = __half2float(xs[x_slot(j)]);
    if (kMasked) xv = (j >= lo && j < hi) ? xv : 0.f;
    acc = fmaf(static_cast<float>(code) - z, xv, acc);
  }
  return acc;
}

template <int BITS> struct Chunk;
template <> struct Chunk<4> { uint4 w; };
template <> struct Chunk<3> { uint32_t w[3]; };

template <int BITS>
__device__ __forceinline__ Chunk<BITS> load_chunk(const uint8_t* p) {
  Chunk<BITS> c;
  if constexpr (BITS == 4) {
    c.w = __ldg(reinterpret_cast<const uint4*>(p));
  } else {
    const uint32_t* q = reinterpret_cast<const uint32_t*>(p);
    c.w[0] = __ldg(q); c.w[1] = __ldg(q + 1); c.w[2] = __ldg(q + 2);
  }
  return c;
}

template <int BITS>
__device__ __forceinline__ Chunk<BITS> zero_chunk() {
  Chunk<BITS> c;
  if constexpr (BITS == 4) c.w = make_uint4(0, 0, 0, 0); else { c.w[0] = c.w[1] = c.w[2] = 0; }
  return c;
}

template <int BITS, bool kMasked>
__device__ __forceinline__ float chunk_dot(const Chunk<BITS>& c, const __half* xs, float z, int lo, int hi) {
  if constexpr (BITS == 4) {
    const __half2 zh = __float2half2_rn(1024.f + z);
    return chunk_dot_q4<kMasked>(c.w, reinterpret_cast<const uint4*>(xs), zh, lo, hi);
  } else {
    return chunk_dot_q3<kMasked>(c.w, xs, z, lo, hi);
  }
}

template <typename S> __device__ __forceinline__ float load_scale(const S* p) { return to_float(*p); }

// grid: ceil(N / (kWarps * kRowsPerWarp)); block: kWarps * 32 threads.
// shared: [M][K] staged x (fp16), group starts [G + 1], chunk → group [K / 32].
template <int BITS, int M, typename S>
__global__ void __launch_bounds__(kWarps * 32)
gemv_kernel(const __half* __restrict__ x, int m_rows, const uint8_t* __restrict__ qweight,
            const S* __restrict__ scales, const uint8_t* __restrict__ zeros, const int* __restrict__ sizes,
            const int* __restrict__ global_starts, int G, int N, int K, const void* __restrict__ bias,
            bool bias_half, __half* __restrict__ y) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __half* xs = reinterpret_cast<__half*>(smem_raw);                               // [M][K]
  int* chunk_group = reinterpret_cast<int*>(smem_raw + sizeof(__half) * M * K);   // [K/32]
  int* starts_smem = chunk_group + K / 32;                                        // [G+1]
  const int nchunk = K / 32;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n0 = (blockIdx.x * kWarps + warp) * kRowsPerWarp;
  const int64_t rb = row_bytes(K, BITS);

  Chunk<BITS> w[kUnroll][kRowsPerWarp];
  auto load_batch = [&](int c0) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * 32 + lane;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int n = n0 + r;
        w[u][r] = (c < nchunk && n < N) ? load_chunk<BITS>(qweight + n * rb + (int64_t)c * block_bytes(BITS))
                                        : zero_chunk<BITS>();
      }
    }
  };
  // The first weight loads go out before x is staged: their DRAM latency overlaps the prologue.
  load_batch(0);

  // Stage x / 256 in decode order (8 values a thread, one 16-byte load); rows ≥ m_rows are zero.
  for (int idx = threadIdx.x; idx < M * K / 8; idx += blockDim.x) {
    const int m = (idx * 8) / K, k = idx * 8 - m * K;
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (m < m_rows) raw = __ldg(reinterpret_cast<const uint4*>(x + (int64_t)m * K + k));
    const __half* h = reinterpret_cast<const __half*>(&raw);
#pragma unroll
    for (int e = 0; e < 8; ++e)
      xs[m * K + ((k + e) & ~31) + x_slot((k + e) & 31)] = __float2half_rn(__half2float(h[e]) * (1.f / kXShift));
  }
  const int* starts = load_group_starts(sizes, global_starts, G, starts_smem);  // syncs
  for (int c = threadIdx.x; c < nchunk; c += blockDim.x) chunk_group[c] = find_group(starts, G, c * 32);
  __syncthreads();

  float acc[kRowsPerWarp][M];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;

  for (int c0 = 0; c0 < nchunk; c0 += 32 * kUnroll) {
    if (c0 > 0) load_batch(c0);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * 32 + lane;
      if (c >= nchunk) continue;
      const int k0 = c * 32;
      int g = chunk_group[c];
      int gend = starts[g + 1];
      if (gend >= k0 + 32) {  // the whole chunk is in group g: the common case
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const int n = min(n0 + r, N - 1);
          const float s = load_scale(scales + (int64_t)n * G + g);
          const float z = static_cast<float>(zeros[(int64_t)n * G + g]);
#pragma unroll
          for (int m = 0; m < M; ++m)
            acc[r][m] = fmaf(s, chunk_dot<BITS, false>(w[u][r], xs + m * K + k0, z, 0, 32), acc[r][m]);
        }
      } else {  // the chunk crosses group boundaries: one masked pass per group segment
        int lo = 0;
        while (true) {
          const int hi = min(gend - k0, 32);
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            const int n = min(n0 + r, N - 1);
            const float s = load_scale(scales + (int64_t)n * G + g);
            const float z = static_cast<float>(zeros[(int64_t)n * G + g]);
#pragma unroll
            for (int m = 0; m < M; ++m)
              acc[r][m] = fmaf(s, chunk_dot<BITS, true>(w[u][r], xs + m * K + k0, z, lo, hi), acc[r][m]);
          }
          if (hi >= 32) break;
          lo = hi;
          ++g;
          gend = starts[g + 1];
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int n = n0 + r;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float v = warp_sum(acc[r][m]) * kXShift;
      if (lane == 0 && n < N && m < m_rows) {
        float b = 0.f;
        if (bias != nullptr)
          b = bias_half ? __half2float(static_cast<const __half*>(bias)[n]) : static_cast<const float*>(bias)[n];
        y[(int64_t)m * N + n] = __float2half_rn(v + b);
      }
    }
  }
}

// General dequantization: W[n, k] in T, one thread per (row, 32-code block), any bit width and groups.
template <typename T, typename S>
__global__ void dequant_kernel(const uint8_t* __restrict__ qweight, const S* __restrict__ scales,
                               const uint8_t* __restrict__ zeros, const int* __restrict__ sizes,
                               const int* __restrict__ global_starts, int G, int N, int K, int bits,
                               T* __restrict__ w) {
  extern __shared__ int starts_smem[];
  const int* starts = load_group_starts(sizes, global_starts, G, starts_smem);
  const int nblk = static_cast<int>(ceil_div(K, kBlockCodes));
  const int64_t rb = row_bytes(K, bits);
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < (int64_t)N * nblk;
       t += (int64_t)gridDim.x * blockDim.x) {
    const int n = static_cast<int>(t / nblk), b = static_cast<int>(t % nblk);
    const uint8_t* row = qweight + n * rb;
    int g = find_group(starts, G, b * 32);
    for (int j = 0; j < 32; ++j) {
      const int k = b * 32 + j;
      if (k >= K) break;
      while (starts[g + 1] <= k) ++g;
      const float s = to_float(scales[(int64_t)n * G + g]);
      const float z = static_cast<float>(zeros[(int64_t)n * G + g]);
      w[(int64_t)n * K + k] = from_float<T>((static_cast<float>(get_code(row, k, bits)) - z) * s);
    }
  }
}

template <int BITS, int M, typename S>
void launch_gemv(const at::Tensor& x, int m_rows, const at::Tensor& qweight, const at::Tensor& scales,
                 const at::Tensor& zeros, const GroupTable& gt, int N, int K, const at::Tensor& bias, at::Tensor& y) {
  auto kernel = gemv_kernel<BITS, M, S>;
  const size_t smem = sizeof(__half) * M * K + sizeof(int) * (K / 32) + gt.smem_bytes;
  ensure_smem<gemv_kernel<BITS, M, S>>(smem);
  const int rows_per_block = kWarps * kRowsPerWarp;
  const int grid = static_cast<int>(ceil_div(N, rows_per_block));
  kernel<<<grid, kWarps * 32, smem, current_stream()>>>(
      reinterpret_cast<const __half*>(x.data_ptr<at::Half>()), m_rows, qweight.data_ptr<uint8_t>(),
      reinterpret_cast<const S*>(scales.data_ptr()), zeros.data_ptr<uint8_t>(), gt.sizes, gt.global_starts, gt.G, N,
      K, bias.defined() ? bias.data_ptr() : nullptr, bias.defined() && bias.scalar_type() == at::kHalf,
      reinterpret_cast<__half*>(y.data_ptr<at::Half>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int BITS, typename S>
void dispatch_gemv_m(const at::Tensor& x, int m_rows, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& zeros, const GroupTable& gt, int N, int K, const at::Tensor& bias, at::Tensor& y) {
  if (m_rows <= 1) launch_gemv<BITS, 1, S>(x, m_rows, qweight, scales, zeros, gt, N, K, bias, y);
  else if (m_rows <= 2) launch_gemv<BITS, 2, S>(x, m_rows, qweight, scales, zeros, gt, N, K, bias, y);
  else if (m_rows <= 4) launch_gemv<BITS, 4, S>(x, m_rows, qweight, scales, zeros, gt, N, K, bias, y);
  else launch_gemv<BITS, 8, S>(x, m_rows, qweight, scales, zeros, gt, N, K, bias, y);
}

}  // namespace

// The fp weight in `dtype` (used by the GEMM path here and by linear_aq's general path).
at::Tensor dequant_weight_cuda(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                               const GroupTable& gt, int64_t bits, int64_t K, at::ScalarType dtype) {
  const int64_t N = scales.size(0);
  at::Tensor w = at::empty({N, K}, qweight.options().dtype(dtype));
  if (N == 0 || K == 0) return w;
  const int64_t work = N * ceil_div(K, kBlockCodes);
  const int grid = static_cast<int>(std::min<int64_t>(ceil_div(work, kDequantThreads), kDequantMaxBlocks));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rptq_dequant", [&] {
    auto run = [&](auto stag) {
      using St = decltype(stag);
      dequant_kernel<scalar_t, St><<<grid, kDequantThreads, gt.smem_bytes, current_stream()>>>(
          qweight.data_ptr<uint8_t>(), scales.data_ptr<St>(), zeros.data_ptr<uint8_t>(), gt.sizes,
          gt.global_starts, gt.G, (int)N, (int)K, (int)bits, w.data_ptr<scalar_t>());
    };
    if (scales.scalar_type() == at::kHalf) run(at::Half{}); else run(float{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return w;
}

// The GEMV's shared memory: kGemvMaxRows staged rows of x, the chunk → group table and (≤ kMaxSmemGroups)
// group starts.
size_t gemv_smem_bytes(int64_t K) {
  return sizeof(__half) * kGemvMaxRows * K + sizeof(int) * (K / kBlockCodes) + sizeof(int) * (kMaxSmemGroups + 1);
}

bool gemv_applies(const at::Tensor& x, int64_t rows, int64_t K, int64_t bits) {
  return x.scalar_type() == at::kHalf && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && rows >= 1 &&
         rows <= kGemvMaxRows && (bits == 4 || bits == 3) && K % kBlockCodes == 0 && K > 0 &&
         gemv_smem_bytes(K) <= device_limits(x.get_device()).smem_optin;
}

// After the checks: the general A16 path (also linear_aq's decode and fallback path, on fake-quantized x).
at::Tensor run_linear_a16_cuda(const at::Tensor& x_in, const at::Tensor& qweight_in, const at::Tensor& scales_in,
                               const at::Tensor& zeros_in, const at::Tensor& group_sizes, int64_t bits,
                               const std::optional<at::Tensor>& bias_in) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor qweight = qweight_in.contiguous();
  const at::Tensor scales =
      (scales_in.scalar_type() == at::kHalf ? scales_in : scales_in.to(at::kFloat)).contiguous();
  const at::Tensor zeros = zeros_in.contiguous();
  const int64_t K = x.size(-1), N = scales.size(0);
  const int64_t rows = K ? x.numel() / K : 0;
  GroupTable gt = make_group_table(group_sizes, x.device());
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();

  if (gemv_applies(x, rows, K, bits)) {
    at::Tensor y = at::empty(out_shape, x.options());
    if (bias.defined() && bias.scalar_type() != at::kHalf) bias = bias.to(at::kFloat);
    const int m = static_cast<int>(rows);
    if (bits == 4) {
      if (scales.scalar_type() == at::kHalf) dispatch_gemv_m<4, __half>(x, m, qweight, scales, zeros, gt, N, K, bias, y);
      else dispatch_gemv_m<4, float>(x, m, qweight, scales, zeros, gt, N, K, bias, y);
    } else {
      if (scales.scalar_type() == at::kHalf) dispatch_gemv_m<3, __half>(x, m, qweight, scales, zeros, gt, N, K, bias, y);
      else dispatch_gemv_m<3, float>(x, m, qweight, scales, zeros, gt, N, K, bias, y);
    }
    return y;
  }
  // GEMM: dequantize to x's dtype, then cuBLAS.
  const at::Tensor w = dequant_weight_cuda(qweight, scales, zeros, gt, bits, K, x.scalar_type());
  if (bias.defined()) bias = bias.to(x.scalar_type());
  return at::linear(x, w, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt);
}

at::Tensor linear_a16_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& zeros, const at::Tensor& group_sizes, int64_t bits,
                           const std::optional<at::Tensor>& bias) {
  rptq_checks::check_linear_a16(x, qweight, scales, zeros, group_sizes, bits, bias);
  return run_linear_a16_cuda(x, qweight, scales, zeros, group_sizes, bits, bias);
}

TORCH_LIBRARY_IMPL(rptq, CUDA, m) { m.impl("linear_a16", &linear_a16_cuda); }

}  // namespace rptq_cuda
