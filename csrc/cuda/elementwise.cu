// Memory-bound rptq ops on CUDA: weight pack/unpack, activation (fake-)quantization, the fused
// reorder-norm(-quantize), and the KV cache pack / unpack / append. Each kernel is one pass over its
// data; the layouts are pack.py's block_q{bits}, the grid is grid.py's (see common.cuh).
#include "common.cuh"

namespace rptq_cuda {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n, int threads = kThreads) {
  return static_cast<int>(std::min<int64_t>(ceil_div(n, threads), 65535LL * 8));
}

// ---------------------------------------------------------------------------------------------
// pack / unpack: one thread per block of 32 codes.
// ---------------------------------------------------------------------------------------------
__global__ void pack_rows_kernel(const uint8_t* __restrict__ codes, uint8_t* __restrict__ out, int64_t rows,
                                 int length, int bits) {
  const int nblk = (length + 31) / 32;
  const int bb = 4 * bits;
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < rows * nblk;
       t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = t / nblk;
    const int b = static_cast<int>(t % nblk);
    int c[32];
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int k = b * 32 + j;
      c[j] = k < length ? codes[r * length + k] : 0;  // the last block is padded with code 0
    }
    put_block(c, out + r * (int64_t)nblk * bb + (int64_t)b * bb, bits);
  }
}

__global__ void unpack_rows_kernel(const uint8_t* __restrict__ packed, uint8_t* __restrict__ codes, int64_t rows,
                                   int length, int bits) {
  const int nblk = (length + 31) / 32;
  const int64_t row_bytes = (int64_t)nblk * 4 * bits;
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < rows * length;
       t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = t / length;
    const int k = static_cast<int>(t % length);
    codes[t] = static_cast<uint8_t>(get_code(packed + r * row_bytes, k, bits));
  }
}

// ---------------------------------------------------------------------------------------------
// Activation quantization on per-channel-group grids. One block handles a strip of rows; the group
// table lives in shared memory, each channel finds its group by binary search once per row strip.
// ---------------------------------------------------------------------------------------------
template <typename T, bool kFake>
__global__ void quantize_act_kernel(const T* __restrict__ x, const float* __restrict__ act_scale,
                                    const int* __restrict__ act_zero, const int* __restrict__ sizes,
                                    const int* __restrict__ global_starts, int G, int64_t rows, int C, int qmax,
                                    uint8_t* __restrict__ codes, T* __restrict__ fake) {
  extern __shared__ int smem_starts[];
  const int* starts = load_group_starts(sizes, global_starts, G, smem_starts);
  const float fq = static_cast<float>(qmax);
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const int g = find_group(starts, G, c);
    const float scale = act_scale[g];
    const float inv = 1.0f / scale;
    const float zero = static_cast<float>(act_zero[g]);
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
      const int code = quant_code(to_float(x[r * C + c]), inv, zero, fq);
      if (kFake) {
        fake[r * C + c] = from_float<T>((static_cast<float>(code) - zero) * scale);
      } else {
        codes[r * C + c] = static_cast<uint8_t>(code);
      }
    }
  }
}

template <bool kFake>
at::Tensor quantize_act_impl(const at::Tensor& x_in, const at::Tensor& act_scale_in, const at::Tensor& act_zero_in,
                             const at::Tensor& act_group_sizes, int64_t bits) {
  RPTQ_CHECK(x_in.is_cuda(), "x must be a CUDA tensor");
  RPTQ_CHECK(bits >= 1 && bits <= 8, "activation bits must be in 1..8, got ", bits);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor act_scale = act_scale_in.to(x.device(), at::kFloat).contiguous();
  const at::Tensor act_zero = act_zero_in.to(x.device(), at::kInt).contiguous();
  const int C = static_cast<int>(x.size(-1));
  const int64_t rows = C ? x.numel() / C : 0;
  GroupTable gt = make_group_table(act_group_sizes, x.device());
  RPTQ_CHECK(act_scale.numel() == gt.G && act_zero.numel() == gt.G, "one act_scale/act_zero per group");
  at::Tensor out = kFake ? at::empty_like(x) : at::empty(x.sizes(), x.options().dtype(at::kByte));
  if (x.numel() == 0) return out;
  const int grid = static_cast<int>(std::min<int64_t>(rows, 4096));
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rptq_quantize_act", [&] {
    quantize_act_kernel<scalar_t, kFake><<<grid, kThreads, gt.smem_bytes, stream>>>(
        x.data_ptr<scalar_t>(), act_scale.data_ptr<float>(), act_zero.data_ptr<int>(), gt.sizes,
        gt.global_starts, gt.G, rows, C, (1 << bits) - 1, kFake ? nullptr : out.data_ptr<uint8_t>(),
        kFake ? out.data_ptr<scalar_t>() : nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---------------------------------------------------------------------------------------------
// reorder_norm: y = norm(x[perm]) * weight + bias (+ fake-quant). One block per row; the gathered row
// is kept in shared memory (float) so x is read once; mean and variance are two exact passes over it
// (as the float32 reference computes them), not a one-pass E[x²] - E[x]².
// ---------------------------------------------------------------------------------------------
constexpr int kNormThreads = 256;

__device__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // red may still be read by the previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += red[w];
  return total;
}

template <typename T, typename W>
__global__ void reorder_norm_kernel(const T* __restrict__ x, const int64_t* __restrict__ perm,
                                    const W* __restrict__ weight, const W* __restrict__ bias, float eps, bool rms,
                                    int C, const float* __restrict__ act_scale, const int* __restrict__ act_zero,
                                    const int* __restrict__ sizes, const int* __restrict__ global_starts, int G,
                                    int qmax, T* __restrict__ y) {
  extern __shared__ float smem[];
  float* row = smem;                                         // [C]
  float* red = smem + C;                                     // [32]
  int* starts_smem = reinterpret_cast<int*>(smem + C + 32);  // [G + 1] when quantizing
  const int64_t r = blockIdx.x;
  const T* xr = x + r * C;
  float s = 0.f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const float v = to_float(xr[perm[c]]);
    row[c] = v;
    s += rms ? v * v : v;
  }
  const float total = block_sum(s, red);
  float mean = 0.f, rstd;
  if (rms) {
    rstd = 1.0f / sqrtf(total / C + eps);
  } else {
    mean = total / C;
    float s2 = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      const float d = row[c] - mean;
      s2 += d * d;
    }
    rstd = 1.0f / sqrtf(block_sum(s2, red) / C + eps);
  }
  const int* starts = nullptr;
  if (qmax > 0) starts = load_group_starts(sizes, global_starts, G, starts_smem);
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float v = (row[c] - mean) * rstd * to_float(weight[c]);
    if (bias != nullptr) v += to_float(bias[c]);
    if (qmax > 0) {  // fake-quantize on the next linear's input grid (a reorder point's clusters)
      const int g = find_group(starts, G, c);
      const float scale = act_scale[g];
      const float zero = static_cast<float>(act_zero[g]);
      v = (static_cast<float>(quant_code(v, 1.0f / scale, zero, static_cast<float>(qmax))) - zero) * scale;
    }
    y[r * C + c] = from_float<T>(v);
  }
}

// ---------------------------------------------------------------------------------------------
// KV cache: x [B, H, T, D] → rows of ceil(D/32) blocks. One thread per (row, block): it quantizes 32
// channels with their per-channel (scale, zero) of head h and writes the block.
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void kv_pack_kernel(const T* __restrict__ x, const float* __restrict__ scale,
                               const int* __restrict__ zero, int64_t B, int H, int T_, int D, int bits,
                               uint8_t* __restrict__ out, int64_t out_seq_stride_rows, int pos) {
  // out rows are indexed (b, h, pos + t) in a cache of out_seq_stride_rows positions per (b, h)
  const int nblk = (D + 31) / 32;
  const int bb = 4 * bits;
  const float fq = static_cast<float>((1 << bits) - 1);
  const int64_t total = B * H * (int64_t)T_ * nblk;
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total; t += (int64_t)gridDim.x * blockDim.x) {
    const int blk = static_cast<int>(t % nblk);
    const int64_t row = t / nblk;  // (b, h, t) flattened
    const int tt = static_cast<int>(row % T_);
    const int64_t bh = row / T_;
    const int h = static_cast<int>(bh % H);
    int c[32];
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int d = blk * 32 + j;
      if (d < D) {
        const float s = scale[h * D + d];
        c[j] = quant_code(to_float(x[row * D + d]), 1.0f / s, static_cast<float>(zero[h * D + d]), fq);
      } else {
        c[j] = 0;
      }
    }
    uint8_t* dst = out + ((bh * out_seq_stride_rows + pos + tt) * nblk + blk) * bb;
    put_block(c, dst, bits);
  }
}

__global__ void kv_unpack_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ scale,
                                 const int* __restrict__ zero, int64_t rows, int H, int T_, int D, int bits,
                                 float* __restrict__ out) {
  const int64_t row_bytes = (int64_t)((D + 31) / 32) * 4 * bits;
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < rows * D; t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = t / D;
    const int d = static_cast<int>(t % D);
    const int h = static_cast<int>((row / T_) % H);
    const int code = get_code(packed + row * row_bytes, d, bits);
    out[t] = (static_cast<float>(code) - static_cast<float>(zero[h * D + d])) * scale[h * D + d];
  }
}

}  // namespace

// =================================================================================================
// Op entry points
// =================================================================================================
at::Tensor pack_weight_cuda(const at::Tensor& codes_in, int64_t bits) {
  check_bits(bits);
  RPTQ_CHECK(codes_in.dim() == 2 && codes_in.scalar_type() == at::kByte, "pack_weight: codes must be uint8 [N, K]");
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous();
  const int64_t N = codes.size(0), K = codes.size(1);
  at::Tensor out = at::empty({N, packed_row_bytes(K, bits)}, codes.options());
  if (N == 0 || K == 0) return out;
  pack_rows_kernel<<<blocks_for(N * ceil_div(K, 32)), kThreads, 0, current_stream()>>>(
      codes.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), N, static_cast<int>(K), static_cast<int>(bits));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unpack_weight_cuda(const at::Tensor& packed_in, int64_t bits, int64_t N, int64_t K) {
  check_bits(bits);
  RPTQ_CHECK(packed_in.dim() == 2 && packed_in.size(0) == N && packed_in.size(1) == packed_row_bytes(K, bits),
             "unpack_weight: packed must be uint8 [", N, ", ", packed_row_bytes(K, bits), "]");
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  at::Tensor out = at::empty({N, K}, packed.options());
  if (N == 0 || K == 0) return out;
  unpack_rows_kernel<<<blocks_for(N * K), kThreads, 0, current_stream()>>>(
      packed.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), N, static_cast<int>(K), static_cast<int>(bits));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor quantize_act_cuda(const at::Tensor& x, const at::Tensor& act_scale, const at::Tensor& act_zero,
                             const at::Tensor& act_group_sizes, int64_t bits) {
  return quantize_act_impl<false>(x, act_scale, act_zero, act_group_sizes, bits);
}

at::Tensor fake_quant_act_cuda(const at::Tensor& x, const at::Tensor& act_scale, const at::Tensor& act_zero,
                               const at::Tensor& act_group_sizes, int64_t bits) {
  return quantize_act_impl<true>(x, act_scale, act_zero, act_group_sizes, bits);
}

at::Tensor reorder_norm_cuda(const at::Tensor& x_in, const at::Tensor& perm_in, const at::Tensor& weight_in,
                             const std::optional<at::Tensor>& bias_in, double eps, bool rms,
                             const std::optional<at::Tensor>& act_scale_in,
                             const std::optional<at::Tensor>& act_zero_in,
                             const std::optional<at::Tensor>& act_group_sizes_in, int64_t act_bits) {
  RPTQ_CHECK(x_in.is_cuda(), "reorder_norm: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int C = static_cast<int>(x.size(-1));
  const int64_t rows = C ? x.numel() / C : 0;
  const at::Tensor perm = perm_in.to(x.device(), at::kLong).contiguous();
  // weight and bias share one dtype inside the kernel: float32 unless both are x's dtype
  at::ScalarType wtype = weight_in.scalar_type();
  if (wtype != x.scalar_type() || (bias_in.has_value() && bias_in->scalar_type() != wtype)) wtype = at::kFloat;
  const at::Tensor weight = weight_in.to(x.device(), wtype).contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(x.device(), wtype).contiguous();
  const bool quant = act_bits < 16;
  at::Tensor act_scale, act_zero;
  GroupTable gt;
  if (quant) {
    RPTQ_CHECK(act_bits >= 1 && act_bits <= 8, "reorder_norm: act_bits must be in 1..8 or 16, got ", act_bits);
    RPTQ_CHECK(act_scale_in.has_value() && act_zero_in.has_value() && act_group_sizes_in.has_value(),
               "reorder_norm: act_bits < 16 needs act_scale, act_zero and act_group_sizes");
    act_scale = act_scale_in->to(x.device(), at::kFloat).contiguous();
    act_zero = act_zero_in->to(x.device(), at::kInt).contiguous();
    gt = make_group_table(*act_group_sizes_in, x.device());
  }
  at::Tensor y = at::empty_like(x);
  if (rows == 0 || C == 0) return y;
  const size_t smem = sizeof(float) * (C + 32) + (quant ? gt.smem_bytes : 0);
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rptq_reorder_norm", [&] {
    using T = scalar_t;
    auto launch = [&](auto wtag) {
      using Wt = decltype(wtag);
      auto kernel = reorder_norm_kernel<T, Wt>;
      ensure_smem<reorder_norm_kernel<T, Wt>>(smem);
      kernel<<<static_cast<unsigned>(rows), kNormThreads, smem, stream>>>(
          x.data_ptr<T>(), perm.data_ptr<int64_t>(), weight.data_ptr<Wt>(),
          bias.defined() ? bias.data_ptr<Wt>() : nullptr, static_cast<float>(eps), rms, C,
          quant ? act_scale.data_ptr<float>() : nullptr, quant ? act_zero.data_ptr<int>() : nullptr,
          quant ? gt.sizes : nullptr, quant ? gt.global_starts : nullptr, quant ? gt.G : 0,
          quant ? (1 << act_bits) - 1 : 0, y.data_ptr<T>());
    };
    if (wtype == x.scalar_type()) launch(T{}); else launch(float{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

namespace {
void kv_pack_launch(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                    at::Tensor& out, int64_t seq_rows, int64_t pos) {
  const int64_t B = x.size(0), H = x.size(1), T_ = x.size(2), D = x.size(3);
  const int64_t total = B * H * T_ * ceil_div(D, 32);
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rptq_kv_pack", [&] {
    kv_pack_kernel<scalar_t><<<blocks_for(total, 128), 128, 0, current_stream()>>>(
        x.data_ptr<scalar_t>(), scale.data_ptr<float>(), zero.data_ptr<int>(), B, (int)H, (int)T_, (int)D,
        (int)bits, out.data_ptr<uint8_t>(), seq_rows, (int)pos);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
}  // namespace

at::Tensor kv_pack_cuda(const at::Tensor& x_in, const at::Tensor& scale_in, const at::Tensor& zero_in, int64_t bits) {
  check_bits(bits);
  RPTQ_CHECK(x_in.dim() == 4 && x_in.is_cuda(), "kv_pack: x must be a CUDA [B, H, T, D] tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor scale = scale_in.to(x.device(), at::kFloat).contiguous();
  const at::Tensor zero = zero_in.to(x.device(), at::kInt).contiguous();
  at::Tensor out = at::empty({x.size(0), x.size(1), x.size(2), packed_row_bytes(x.size(3), bits)},
                             x.options().dtype(at::kByte));
  kv_pack_launch(x, scale, zero, bits, out, x.size(2), 0);
  return out;
}

void kv_append_cuda(const at::Tensor& cache, const at::Tensor& x_in, const at::Tensor& scale_in,
                    const at::Tensor& zero_in, int64_t bits, int64_t pos) {
  check_bits(bits);
  RPTQ_CHECK(x_in.dim() == 4 && cache.dim() == 4, "kv_append: x and cache must be 4-D");
  RPTQ_CHECK(cache.is_contiguous() && cache.scalar_type() == at::kByte, "kv_append: cache must be contiguous uint8");
  RPTQ_CHECK(cache.size(0) == x_in.size(0) && cache.size(1) == x_in.size(1) &&
                 cache.size(3) == packed_row_bytes(x_in.size(3), bits),
             "kv_append: cache does not match x");
  RPTQ_CHECK(pos >= 0 && pos + x_in.size(2) <= cache.size(2), "kv_append: positions out of the cache");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor scale = scale_in.to(x.device(), at::kFloat).contiguous();
  const at::Tensor zero = zero_in.to(x.device(), at::kInt).contiguous();
  at::Tensor out = cache;  // written in place
  kv_pack_launch(x, scale, zero, bits, out, cache.size(2), pos);
}

at::Tensor kv_unpack_cuda(const at::Tensor& packed_in, const at::Tensor& scale_in, const at::Tensor& zero_in,
                          int64_t bits, int64_t D) {
  check_bits(bits);
  RPTQ_CHECK(packed_in.dim() == 4 && packed_in.size(3) == packed_row_bytes(D, bits),
             "kv_unpack: packed must be [B, H, T, ", packed_row_bytes(D, bits), "]");
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor scale = scale_in.to(packed.device(), at::kFloat).contiguous();
  const at::Tensor zero = zero_in.to(packed.device(), at::kInt).contiguous();
  at::Tensor out = at::empty({packed.size(0), packed.size(1), packed.size(2), D}, packed.options().dtype(at::kFloat));
  const int64_t rows = packed.size(0) * packed.size(1) * packed.size(2);
  if (rows == 0 || D == 0) return out;
  kv_unpack_kernel<<<blocks_for(rows * D), kThreads, 0, current_stream()>>>(
      packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<int>(), rows, (int)packed.size(1),
      (int)packed.size(2), (int)D, (int)bits, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(rptq, CUDA, m) {
  m.impl("pack_weight", &pack_weight_cuda);
  m.impl("unpack_weight", &unpack_weight_cuda);
  m.impl("quantize_act", &quantize_act_cuda);
  m.impl("fake_quant_act", &fake_quant_act_cuda);
  m.impl("reorder_norm", &reorder_norm_cuda);
  m.impl("kv_pack", &kv_pack_cuda);
  m.impl("kv_append", &kv_append_cuda);
  m.impl("kv_unpack", &kv_unpack_cuda);
}

}  // namespace rptq_cuda
