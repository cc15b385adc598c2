// rptq::linear_aq on CUDA: y = fake_quant(x) @ W.T + bias, computed with integer tensor-core MMAs.
//
//   Σ_k x̂_k ŵ_nk = Σ_g sa_g · sw_ng · Σ_{k∈g} (a_k - za_g)(w_nk - zw_ng)
//               = Σ_g sa_g · sw_ng · ( Σ_{k∈g} a_k w'_nk  -  za_g · Σ_{k∈g} w'_nk ),   w' = w - zw
//
// a: activation codes (u8, up to 8 bits, asymmetric), w': centred 4-bit weight codes in [-15, 15] (s8).
// The first sum is mma.sync.m16n8k32.u8.s8 (sm_80+; Hopper has no int4 MMA, so 4-bit weights are
// widened to int8 in registers); the second is a dp4a of the same B fragments with a vector of ones.
// Both are exact integers per group; the float scales are applied once per group ("flush").
//
// pack.py's block_q4 puts codes 4t..4t+3 in the low nibbles and 16+4t..16+4t+3 in the high nibbles of
// 32-bit word t of a block, which is exactly the m16n8k32 B fragment of lane (n, t): one ldmatrix gives
// a lane its word, `& 0x0F0F0F0F` is b0 and `>> 4 & 0x0F0F0F0F` is b1. No repacking of the checkpoint.
//
// Groups (= the activation clusters) are uneven: the k loop runs over 32-wide steps and splits a step
// that crosses a group boundary into one MMA per segment, with the A bytes (and the ones of the weight
// sum) outside the segment masked to zero; accumulators are flushed with the group's scales at its end.
//
// Small batches (≤ kGemvMaxRows rows, decode) are bound by the weight bytes, not the MMA: there x is fake-quantized
// and the W4A16 GEMV runs (same result up to float rounding). Other widths/shapes: fake-quant + the
// dequantize-and-cuBLAS path.
#include "common.cuh"

namespace rptq_cuda {
namespace {

constexpr int BM = 128, BN = 128, BK = 64, STAGES = 3, THREADS = 256;
constexpr int A_STRIDE = 80;  // bytes per A row in shared memory: 64 + 16 padding (conflict-free ldmatrix)
constexpr int B_STRIDE = 48;  // bytes per B row: 32 (64 4-bit codes) + 16 padding
constexpr int STAGE_BYTES = BM * A_STRIDE + BN * B_STRIDE;
constexpr int kMmaWeightBits = 4;  // the MMA path reads block_q4 words as B fragments (header comment)
constexpr int kQuantizeThreads = 256;
constexpr int64_t kQuantizeMaxBlocks = 16384;  // a grid-stride loop covers the rest

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;  // 0 → the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void mma_u8s8(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Byte mask for 4 consecutive k (k0..k0+3): 0xFF where lo <= k < hi.
__device__ __forceinline__ uint32_t byte_mask(int k0, int lo, int hi, uint32_t on) {
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) m |= ((k0 + i >= lo && k0 + i < hi) ? on : 0u) << (8 * i);
  return m;
}

// x [M, K] → activation codes [M, Kp] (Kp = K rounded up to BK, padded with code 0). 16 codes a thread.
template <typename T>
__global__ void quantize_a_kernel(const T* __restrict__ x, const float* __restrict__ act_scale,
                                  const int* __restrict__ act_zero, const int* __restrict__ sizes,
                                  const int* __restrict__ global_starts, int G, int M, int K, int Kp, int qmax,
                                  uint8_t* __restrict__ a) {
  extern __shared__ int starts_smem[];
  const int* starts = load_group_starts(sizes, global_starts, G, starts_smem);
  const int per_row = Kp / 16;
  const float fq = static_cast<float>(qmax);
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < (int64_t)M * per_row;
       t += (int64_t)gridDim.x * blockDim.x) {
    const int m = static_cast<int>(t / per_row), c = static_cast<int>(t % per_row);
    const int k0 = c * 16;
    uint32_t words[4] = {0, 0, 0, 0};
    if (k0 < K) {
      int g = find_group(starts, G, k0);
      float scale = act_scale[g], inv = 1.0f / scale, zero = static_cast<float>(act_zero[g]);
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const int k = k0 + j;
        if (k < K) {
          if (k >= starts[g + 1]) {
            while (k >= starts[g + 1]) ++g;
            scale = act_scale[g]; inv = 1.0f / scale; zero = static_cast<float>(act_zero[g]);
          }
          const uint32_t code = quant_code(to_float(x[(int64_t)m * K + k]), inv, zero, fq);
          words[j >> 2] |= code << (8 * (j & 3));
        }
      }
    }
    *reinterpret_cast<uint4*>(a + (int64_t)m * Kp + k0) = make_uint4(words[0], words[1], words[2], words[3]);
  }
}

template <typename T, typename S>
__global__ void __launch_bounds__(THREADS, 1)
w4a8_gemm_kernel(const uint8_t* __restrict__ A, int M, int Kp, const uint8_t* __restrict__ qweight, int N, int K,
                 const S* __restrict__ scales, const uint8_t* __restrict__ zeros, const float* __restrict__ act_scale,
                 const int* __restrict__ act_zero, const int* __restrict__ sizes,
                 const int* __restrict__ global_starts, int G, const void* __restrict__ bias, int bias_kind,
                 T* __restrict__ y) {
  extern __shared__ __align__(128) unsigned char smem[];
  int* starts_smem = reinterpret_cast<int*>(smem + STAGES * STAGE_BYTES);
  const int* starts = load_group_starts(sizes, global_starts, G, starts_smem);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;  // 2 x 4 warps; a warp owns 64 rows x 32 columns
  const int gl = lane >> 2, tl = lane & 3;   // mma groupID / thread-in-group
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int64_t rb = row_bytes(K, kMmaWeightBits);
  const int KT = Kp / BK;

  auto stage_a = [&](int s) { return smem + s * STAGE_BYTES; };
  auto stage_b = [&](int s) { return smem + s * STAGE_BYTES + BM * A_STRIDE; };

  auto load_stage = [&](int s, int kt) {
    uint8_t* sa = stage_a(s);
    uint8_t* sb = stage_b(s);
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // A: 128 rows x 4 chunks of 16 bytes
      const int ch = tid + i * THREADS, row = ch >> 2, col = ch & 3;
      const bool ok = m0 + row < M;
      const uint8_t* src = A + (int64_t)(ok ? m0 + row : 0) * Kp + kt * BK + col * 16;
      cp_async16(sa + row * A_STRIDE + col * 16, src, ok);
    }
    {  // B: 128 rows x 2 blocks of 16 bytes (32 codes each)
      const int row = tid >> 1, half = tid & 1;
      const int blk = kt * 2 + half;
      const bool ok = (n0 + row < N) && (blk < K / 32);
      const uint8_t* src = qweight + (int64_t)(ok ? n0 + row : 0) * rb + (ok ? blk : 0) * block_bytes(kMmaWeightBits);
      cp_async16(sb + row * B_STRIDE + half * 16, src, ok);
    }
  };

  int acc[4][4][4];
  float out[4][4][4];
  int wsum[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    wsum[i] = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) { acc[i][j][q] = 0; out[i][j][q] = 0.f; }
  }

  // Current group (block-uniform) and the zero-points of this lane's 4 B columns, replicated in 4 bytes.
  int cur_g = 0;
  uint32_t zrep[4];
  auto load_zrep = [&]() {
#pragma unroll
    for (int nf = 0; nf < 4; ++nf) {
      const int n = n0 + wn * 32 + nf * 8 + gl;
      const uint32_t z = (n < N && cur_g < G) ? zeros[(int64_t)n * G + cur_g] : 0u;
      zrep[nf] = z * 0x01010101u;
    }
  };
  load_zrep();

  // int32 → float without the quarter-rate I2F: for |v| < 2^22, the bits of 1.5·2^23 + v are the
  // float 1.5·2^23 + v. A group's |Σ (a - za)(w - zw)| ≤ 255 · 15 · size < 2^22 when size ≤ 1024.
  auto to_f = [](int v, bool small) {
    return small ? __int_as_float(v + 0x4B400000) - 12582912.0f : static_cast<float>(v);
  };
  auto flush = [&](int g) {
    const float sa = act_scale[g];
    const int za = act_zero[g];
    const bool small = starts[g + 1] - starts[g] <= 1024;
#pragma unroll
    for (int nf = 0; nf < 4; ++nf) {
      int ws = wsum[nf];
      ws += __shfl_xor_sync(0xffffffffu, ws, 1);
      ws += __shfl_xor_sync(0xffffffffu, ws, 2);  // column (nf*8 + gl) summed over the 32 k of each step
      const int w0 = __shfl_sync(0xffffffffu, ws, (2 * tl) * 4);      // column 2*tl of the C fragment
      const int w1 = __shfl_sync(0xffffffffu, ws, (2 * tl + 1) * 4);  // column 2*tl + 1
      wsum[nf] = 0;
      const int nc = n0 + wn * 32 + nf * 8 + 2 * tl;
      const float f0 = nc < N ? sa * to_float(scales[(int64_t)nc * G + g]) : 0.f;
      const float f1 = nc + 1 < N ? sa * to_float(scales[(int64_t)(nc + 1) * G + g]) : 0.f;
#pragma unroll
      for (int mf = 0; mf < 4; ++mf) {
        out[mf][nf][0] = fmaf(f0, to_f(acc[mf][nf][0] - za * w0, small), out[mf][nf][0]);
        out[mf][nf][1] = fmaf(f1, to_f(acc[mf][nf][1] - za * w1, small), out[mf][nf][1]);
        out[mf][nf][2] = fmaf(f0, to_f(acc[mf][nf][2] - za * w0, small), out[mf][nf][2]);
        out[mf][nf][3] = fmaf(f1, to_f(acc[mf][nf][3] - za * w1, small), out[mf][nf][3]);
        acc[mf][nf][0] = acc[mf][nf][1] = acc[mf][nf][2] = acc[mf][nf][3] = 0;
      }
    }
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (kt + STAGES - 1 < KT) load_stage((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
    cp_async_commit();

    const uint8_t* sa = stage_a(kt % STAGES);
    const uint8_t* sb = stage_b(kt % STAGES);
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const int kbase = kt * BK + kk * 32;
      if (kbase >= K) break;  // the zero padding of Kp
      uint32_t af[4][4];
#pragma unroll
      for (int mf = 0; mf < 4; ++mf)
        ldmatrix_x4(af[mf], sa + (wm * 64 + mf * 16 + (lane & 15)) * A_STRIDE + kk * 32 + (lane >> 4) * 16);
      uint32_t braw[4];
      ldmatrix_x4(braw, sb + (wn * 32 + lane) * B_STRIDE + kk * 16);

      int seg_lo = kbase;
      while (true) {
        const int gend = starts[cur_g + 1];
        const int seg_hi = min(gend, kbase + 32);
        const bool full = seg_lo == kbase && seg_hi == kbase + 32;
        // Lane's k: 4*tl..+3 (a0, a1, b0) and 16 + 4*tl..+3 (a2, a3, b1), relative to kbase.
        const uint32_t am_lo = full ? 0xFFFFFFFFu : byte_mask(kbase + 4 * tl, seg_lo, seg_hi, 0xFFu);
        const uint32_t am_hi = full ? 0xFFFFFFFFu : byte_mask(kbase + 16 + 4 * tl, seg_lo, seg_hi, 0xFFu);
        const uint32_t ones_lo = am_lo & 0x01010101u, ones_hi = am_hi & 0x01010101u;
        uint32_t b0[4], b1[4];
#pragma unroll
        for (int nf = 0; nf < 4; ++nf) {
          b0[nf] = __vsub4(braw[nf] & 0x0F0F0F0Fu, zrep[nf]);         // s8 lanes c - z
          b1[nf] = __vsub4((braw[nf] >> 4) & 0x0F0F0F0Fu, zrep[nf]);
          wsum[nf] = __dp4a(static_cast<int>(b0[nf]), static_cast<int>(ones_lo), wsum[nf]);
          wsum[nf] = __dp4a(static_cast<int>(b1[nf]), static_cast<int>(ones_hi), wsum[nf]);
        }
#pragma unroll
        for (int mf = 0; mf < 4; ++mf) {
          uint32_t a[4];
          if (full) {
            a[0] = af[mf][0]; a[1] = af[mf][1]; a[2] = af[mf][2]; a[3] = af[mf][3];
          } else {
            a[0] = af[mf][0] & am_lo; a[1] = af[mf][1] & am_lo; a[2] = af[mf][2] & am_hi; a[3] = af[mf][3] & am_hi;
          }
#pragma unroll
          for (int nf = 0; nf < 4; ++nf) mma_u8s8(acc[mf][nf], a, b0[nf], b1[nf]);
        }
        if (gend <= kbase + 32) {  // group cur_g ends inside this step: apply its scales
          flush(cur_g);
          ++cur_g;
          load_zrep();
        }
        if (seg_hi >= kbase + 32 || cur_g >= G) break;
        seg_lo = seg_hi;
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue: bias, convert, store (pairs of columns).
#pragma unroll
  for (int mf = 0; mf < 4; ++mf) {
#pragma unroll
    for (int nf = 0; nf < 4; ++nf) {
      const int nc = n0 + wn * 32 + nf * 8 + 2 * tl;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int m = m0 + wm * 64 + mf * 16 + gl + half * 8;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int n = nc + j;
          if (n >= N) continue;
          float v = out[mf][nf][half * 2 + j];
          if (bias_kind == 1) v += to_float(static_cast<const at::Half*>(bias)[n]);
          else if (bias_kind == 2) v += static_cast<const float*>(bias)[n];
          else if (bias_kind == 3) v += to_float(static_cast<const at::BFloat16*>(bias)[n]);
          y[(int64_t)m * N + n] = from_float<T>(v);
        }
      }
    }
  }
}

}  // namespace

at::Tensor linear_aq_cuda(const at::Tensor& x_in, const at::Tensor& qweight_in, const at::Tensor& scales_in,
                          const at::Tensor& zeros_in, const at::Tensor& group_sizes, int64_t bits,
                          const at::Tensor& act_scale_in, const at::Tensor& act_zero_in, int64_t act_bits,
                          const std::optional<at::Tensor>& bias_in) {
  rptq_checks::check_linear_aq(x_in, qweight_in, scales_in, zeros_in, group_sizes, bits, act_scale_in, act_zero_in,
                               act_bits, bias_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t K = x.size(-1), N = scales_in.size(0);
  const int64_t rows = K ? x.numel() / K : 0;
  const bool gemm = bits == kMmaWeightBits && K % kBlockCodes == 0 && K > 0 && rows > kGemvMaxRows && N > 0;
  if (!gemm) {
    // decode batches and the general path: quantize-dequantize x, then the A16 kernels
    const at::Tensor xq = run_fake_quant_act_cuda(x, act_scale_in, act_zero_in, group_sizes, act_bits);
    return run_linear_a16_cuda(xq, qweight_in, scales_in, zeros_in, group_sizes, bits, bias_in);
  }
  const at::Tensor qweight = qweight_in.contiguous();
  const at::Tensor scales =
      (scales_in.scalar_type() == at::kHalf ? scales_in : scales_in.to(at::kFloat)).contiguous();
  const at::Tensor zeros = zeros_in.contiguous();
  const at::Tensor act_scale = act_scale_in.to(at::kFloat).contiguous();
  const at::Tensor act_zero = act_zero_in.to(at::kInt).contiguous();
  GroupTable gt = make_group_table(group_sizes, x.device());

  const int M = static_cast<int>(rows);
  const int Kp = static_cast<int>(ceil_div(K, BK) * BK);
  at::Tensor a = at::empty({M, Kp}, x.options().dtype(at::kByte));
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  at::Tensor bias;
  int bias_kind = 0;
  if (bias_in.has_value()) {
    bias = bias_in->contiguous();
    if (bias.scalar_type() == at::kHalf) bias_kind = 1;
    else if (bias.scalar_type() == at::kBFloat16) bias_kind = 3;
    else { bias = bias.to(at::kFloat); bias_kind = 2; }
  }
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rptq_linear_aq", [&] {
    using T = scalar_t;
    const int64_t work = (int64_t)M * (Kp / 16);
    const int qgrid = static_cast<int>(std::min<int64_t>(ceil_div(work, kQuantizeThreads), kQuantizeMaxBlocks));
    quantize_a_kernel<T><<<qgrid, kQuantizeThreads, gt.smem_bytes, stream>>>(
        x.data_ptr<T>(), act_scale.data_ptr<float>(), act_zero.data_ptr<int>(), gt.sizes, gt.global_starts, gt.G, M,
        (int)K, Kp, (1 << act_bits) - 1, a.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto run = [&](auto stag) {
      using St = decltype(stag);
      auto kernel = w4a8_gemm_kernel<T, St>;
      const size_t smem = STAGES * STAGE_BYTES + gt.smem_bytes;
      ensure_smem<w4a8_gemm_kernel<T, St>>(smem);
      const dim3 grid(static_cast<unsigned>(ceil_div(N, BN)), static_cast<unsigned>(ceil_div(M, BM)));
      kernel<<<grid, THREADS, smem, stream>>>(a.data_ptr<uint8_t>(), M, Kp, qweight.data_ptr<uint8_t>(), (int)N,
                                              (int)K, scales.data_ptr<St>(), zeros.data_ptr<uint8_t>(),
                                              act_scale.data_ptr<float>(), act_zero.data_ptr<int>(), gt.sizes,
                                              gt.global_starts, gt.G, bias.defined() ? bias.data_ptr() : nullptr,
                                              bias_kind, y.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (scales.scalar_type() == at::kHalf) run(at::Half{}); else run(float{});
  });
  return y;
}

TORCH_LIBRARY_IMPL(rptq, CUDA, m) { m.impl("linear_aq", &linear_aq_cuda); }

}  // namespace rptq_cuda
