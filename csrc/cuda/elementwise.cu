// Memory-bound rptq ops on CUDA: weight pack/unpack, activation fake-quantization, the fused
// reorder-norm, and the KV cache pack / unpack / append. Each kernel is one pass over its data; the
// layouts are pack.py's block_q{bits} (../layouts.h), the grid is grid.py's (see common.cuh).
#include "common.cuh"

namespace rptq_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kKvPackThreads = 128;
constexpr int64_t kMaxBlocks = 65535LL * 8;  // grid-stride loops cover the rest
constexpr int64_t kQuantMaxBlocks = 4096;    // row strips of quantize_act_kernel

// The checks of checks.h read group sizes and permutations to the host, except while a CUDA graph is being
// captured (a synchronizing copy would break the capture).
const bool kCaptureHookInstalled = (rptq_checks::capturing_hook() = stream_is_capturing, true);

inline int blocks_for(int64_t n, int threads = kThreads) {
  return static_cast<int>(std::min<int64_t>(ceil_div(n, threads), kMaxBlocks));
}

// ---------------------------------------------------------------------------------------------
// pack / unpack: one thread per block of 32 codes.
// ---------------------------------------------------------------------------------------------
__global__ void pack_rows_kernel(const uint8_t* __restrict__ codes, uint8_t* __restrict__ out, int64_t rows,
                                 int length, int bits) {
  const int nblk = static_cast<int>(ceil_div(length, kBlockCodes));
  const int64_t bb = block_bytes(bits), rb = row_bytes(length, bits);
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < rows * nblk;
       t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = t / nblk;
    const int b = static_cast<int>(t % nblk);
    uint8_t c[kBlockCodes];
#pragma unroll
    for (int j = 0; j < kBlockCodes; ++j) {
      const int k = b * kBlockCodes + j;
      c[j] = k < length ? codes[r * length + k] : 0;  // the last block is padded with code 0
    }
    rptq_layout::pack_block(c, bits, out + r * rb + (int64_t)b * bb);
  }
}

__global__ void unpack_rows_kernel(const uint8_t* __restrict__ packed, uint8_t* __restrict__ codes, int64_t rows,
                                   int length, int bits) {
  const int64_t rb = row_bytes(length, bits);
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < rows * length;
       t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = t / length;
    const int k = static_cast<int>(t % length);
    codes[t] = static_cast<uint8_t>(get_code(packed + r * rb, k, bits));
  }
}

// ---------------------------------------------------------------------------------------------
// Activation fake-quantization on per-channel-group grids. One block handles a strip of rows; the group
// table lives in shared memory, each channel finds its group by binary search once per row strip.
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void fake_quant_act_kernel(const T* __restrict__ x, const float* __restrict__ act_scale,
                                      const int* __restrict__ act_zero, const int* __restrict__ sizes,
                                      const int* __restrict__ global_starts, int G, int64_t rows, int C, int qmax,
                                      T* __restrict__ fake) {
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
      fake[r * C + c] = from_float<T>((static_cast<float>(code) - zero) * scale);
    }
  }
}

}  // namespace

at::Tensor run_fake_quant_act_cuda(const at::Tensor& x_in, const at::Tensor& act_scale_in,
                                   const at::Tensor& act_zero_in, const at::Tensor& act_group_sizes, int64_t bits) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor act_scale = act_scale_in.to(at::kFloat).contiguous();
  const at::Tensor act_zero = act_zero_in.to(at::kInt).contiguous();
  const int C = static_cast<int>(x.size(-1));
  const int64_t rows = C ? x.numel() / C : 0;
  GroupTable gt = make_group_table(act_group_sizes, x.device());
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const int grid = static_cast<int>(std::min<int64_t>(rows, kQuantMaxBlocks));
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rptq_fake_quant_act", [&] {
    fake_quant_act_kernel<scalar_t><<<grid, kThreads, gt.smem_bytes, stream>>>(
        x.data_ptr<scalar_t>(), act_scale.data_ptr<float>(), act_zero.data_ptr<int>(), gt.sizes,
        gt.global_starts, gt.G, rows, C, (1 << bits) - 1, out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

namespace {

// ---------------------------------------------------------------------------------------------
// reorder_norm: y = norm(x[perm]) * weight + bias. One block per row; the gathered row
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
                                    int C, T* __restrict__ y) {
  extern __shared__ float smem[];
  float* row = smem;       // [C]
  float* red = smem + C;   // [32]
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
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float v = (row[c] - mean) * rstd * to_float(weight[c]);
    if (bias != nullptr) v += to_float(bias[c]);
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
  const int nblk = static_cast<int>(ceil_div(D, kBlockCodes));
  const int64_t rb = row_bytes(D, bits), bb = block_bytes(bits);
  const float fq = static_cast<float>((1 << bits) - 1);
  const int64_t total = B * H * (int64_t)T_ * nblk;
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total; t += (int64_t)gridDim.x * blockDim.x) {
    const int blk = static_cast<int>(t % nblk);
    const int64_t row = t / nblk;  // (b, h, t) flattened
    const int tt = static_cast<int>(row % T_);
    const int64_t bh = row / T_;
    const int h = static_cast<int>(bh % H);
    uint8_t c[kBlockCodes];
#pragma unroll
    for (int j = 0; j < kBlockCodes; ++j) {
      const int d = blk * kBlockCodes + j;
      if (d < D) {
        const float s = scale[h * D + d];
        c[j] = static_cast<uint8_t>(
            quant_code(to_float(x[row * D + d]), 1.0f / s, static_cast<float>(zero[h * D + d]), fq));
      } else {
        c[j] = 0;  // the last block is padded with code 0
      }
    }
    uint8_t* dst = out + (bh * out_seq_stride_rows + pos + tt) * rb + blk * bb;
    rptq_layout::pack_block(c, bits, dst);
  }
}

__global__ void kv_unpack_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ scale,
                                 const int* __restrict__ zero, int64_t rows, int H, int T_, int D, int bits,
                                 float* __restrict__ out) {
  const int64_t rb = row_bytes(D, bits);
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < rows * D; t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = t / D;
    const int d = static_cast<int>(t % D);
    const int h = static_cast<int>((row / T_) % H);
    const int code = get_code(packed + row * rb, d, bits);
    out[t] = (static_cast<float>(code) - static_cast<float>(zero[h * D + d])) * scale[h * D + d];
  }
}

}  // namespace

// =================================================================================================
// Op entry points: the shared checks (../checks.h) first, then the launch.
// =================================================================================================
at::Tensor pack_weight_cuda(const at::Tensor& codes_in, int64_t bits) {
  rptq_checks::check_pack_weight("pack_weight", codes_in, bits);
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous();
  const int64_t N = codes.size(0), K = codes.size(1);
  at::Tensor out = at::empty({N, row_bytes(K, bits)}, codes.options());
  if (N == 0 || K == 0) return out;
  pack_rows_kernel<<<blocks_for(N * ceil_div(K, kBlockCodes)), kThreads, 0, current_stream()>>>(
      codes.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), N, static_cast<int>(K), static_cast<int>(bits));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unpack_weight_cuda(const at::Tensor& packed_in, int64_t bits, int64_t N, int64_t K) {
  rptq_checks::check_unpack_weight("unpack_weight", packed_in, bits, N, K);
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  at::Tensor out = at::empty({N, K}, packed.options());
  if (N == 0 || K == 0) return out;
  unpack_rows_kernel<<<blocks_for(N * K), kThreads, 0, current_stream()>>>(
      packed.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), N, static_cast<int>(K), static_cast<int>(bits));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor fake_quant_act_cuda(const at::Tensor& x, const at::Tensor& act_scale, const at::Tensor& act_zero,
                               const at::Tensor& act_group_sizes, int64_t bits) {
  rptq_checks::check_fake_quant_act(x, act_scale, act_zero, act_group_sizes, bits);
  return run_fake_quant_act_cuda(x, act_scale, act_zero, act_group_sizes, bits);
}

at::Tensor reorder_norm_cuda(const at::Tensor& x_in, const at::Tensor& perm_in, const at::Tensor& weight_in,
                             const std::optional<at::Tensor>& bias_in, double eps, bool rms) {
  rptq_checks::check_reorder_norm(x_in, perm_in, weight_in, bias_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int C = static_cast<int>(x.size(-1));
  const int64_t rows = C ? x.numel() / C : 0;
  const at::Tensor perm = perm_in.to(at::kLong).contiguous();
  // weight and bias share one dtype inside the kernel: float32 unless both are x's dtype
  at::ScalarType wtype = weight_in.scalar_type();
  if (wtype != x.scalar_type() || (bias_in.has_value() && bias_in->scalar_type() != wtype)) wtype = at::kFloat;
  const at::Tensor weight = weight_in.to(wtype).contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(wtype).contiguous();
  at::Tensor y = at::empty_like(x);
  if (rows == 0 || C == 0) return y;
  const size_t smem = sizeof(float) * (C + 32);
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rptq_reorder_norm", [&] {
    using T = scalar_t;
    auto launch = [&](auto wtag) {
      using Wt = decltype(wtag);
      auto kernel = reorder_norm_kernel<T, Wt>;
      ensure_smem<reorder_norm_kernel<T, Wt>>(smem);
      kernel<<<static_cast<unsigned>(rows), kNormThreads, smem, stream>>>(
          x.data_ptr<T>(), perm.data_ptr<int64_t>(), weight.data_ptr<Wt>(),
          bias.defined() ? bias.data_ptr<Wt>() : nullptr, static_cast<float>(eps), rms, C, y.data_ptr<T>());
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
  const int64_t total = B * H * T_ * ceil_div(D, kBlockCodes);
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rptq_kv_pack", [&] {
    kv_pack_kernel<scalar_t><<<blocks_for(total, kKvPackThreads), kKvPackThreads, 0, current_stream()>>>(
        x.data_ptr<scalar_t>(), scale.data_ptr<float>(), zero.data_ptr<int>(), B, (int)H, (int)T_, (int)D,
        (int)bits, out.data_ptr<uint8_t>(), seq_rows, (int)pos);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
}  // namespace

at::Tensor kv_pack_cuda(const at::Tensor& x_in, const at::Tensor& scale_in, const at::Tensor& zero_in, int64_t bits) {
  rptq_checks::check_kv_pack(x_in, scale_in, zero_in, bits);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor scale = scale_in.to(at::kFloat).contiguous();
  const at::Tensor zero = zero_in.to(at::kInt).contiguous();
  at::Tensor out = at::empty({x.size(0), x.size(1), x.size(2), row_bytes(x.size(3), bits)},
                             x.options().dtype(at::kByte));
  kv_pack_launch(x, scale, zero, bits, out, x.size(2), 0);
  return out;
}

void kv_append_cuda(const at::Tensor& cache, const at::Tensor& x_in, const at::Tensor& scale_in,
                    const at::Tensor& zero_in, int64_t bits, int64_t pos) {
  rptq_checks::check_kv_append(cache, x_in, scale_in, zero_in, bits, pos);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor scale = scale_in.to(at::kFloat).contiguous();
  const at::Tensor zero = zero_in.to(at::kInt).contiguous();
  at::Tensor out = cache;  // written in place
  kv_pack_launch(x, scale, zero, bits, out, cache.size(2), pos);
}

at::Tensor kv_unpack_cuda(const at::Tensor& packed_in, const at::Tensor& scale_in, const at::Tensor& zero_in,
                          int64_t bits, int64_t D) {
  rptq_checks::check_kv_unpack(packed_in, scale_in, zero_in, bits, D);
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor scale = scale_in.to(at::kFloat).contiguous();
  const at::Tensor zero = zero_in.to(at::kInt).contiguous();
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
  m.impl("fake_quant_act", &fake_quant_act_cuda);
  m.impl("reorder_norm", &reorder_norm_cuda);
  m.impl("kv_pack", &kv_pack_cuda);
  m.impl("kv_append", &kv_append_cuda);
  m.impl("kv_unpack", &kv_unpack_cuda);
}

}  // namespace rptq_cuda
