// Shared helpers of the rptq CUDA kernels (sm_80+).
//
// The packed layouts are those of rptq_cli/quant/pack.py (block_q{2,3,4,8}: 32 codes of a row in
// 4*bits bytes), written down for C++ in ../layouts.h; the grid is rptq_cli/quant/grid.py. Every kernel
// here follows them, so the checkpoint layout is used as is: no repacking at load time. Every op wrapper
// calls its check from ../checks.h first (the same checks as the CPU wrappers).
#pragma once

#include <ATen/ATen.h>
// Light c10 headers only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers that a
// bare CUDA toolkit may lack: scripts/cuda_check.sh must compile on such machines).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>

#include "../checks.h"
#include "../layouts.h"

namespace rptq_cuda {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

using rptq_layout::block_bytes;
using rptq_layout::code_at;
using rptq_layout::kBlockCodes;
using rptq_layout::row_bytes;

RPTQ_HD constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows of x at or below this run the GEMV kernels (decode); the GEMV is compiled for 1, 2, 4 and 8 rows.
constexpr int64_t kGemvMaxRows = 8;

// True while the current stream of `device` captures a CUDA graph (checks.h then skips the checks that
// copy contents to the host, which a capture forbids).
inline bool stream_is_capturing(const at::Device& device) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device.index()).stream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

// Device attributes, queried once per device (a host call per launch would cost more than a decode GEMV).
struct DeviceLimits {
  int sms = 0;                 // streaming multiprocessors
  size_t smem_optin = 0;       // dynamic shared memory a block may opt in to
};
inline const DeviceLimits& device_limits(int device) {
  constexpr int kMaxDevices = 64;
  static DeviceLimits limits[kMaxDevices];
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "rptq (cuda): device index ", device, " out of range");
  DeviceLimits& l = limits[device];
  if (l.sms == 0) {
    int smem = 0, sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    l.smem_optin = static_cast<size_t>(smem);
    l.sms = sms;
  }
  return l;
}

// ------------------------------------------------------------------------------------------------
// The affine grid. Codes must be bit-exact against grid.quantize: x * (1/scale) in float32 (IEEE
// division and multiply; this file is never built with --use_fast_math), round half to even (rintf),
// then + zero and clamp, all on exactly representable integers.
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ int quant_code(float x, float inv_scale, float zero, float qmax) {
  float q = rintf(x * inv_scale) + zero;
  q = fminf(fmaxf(q, 0.f), qmax);
  return static_cast<int>(q);
}

// One code of a packed row (layouts.h): the general path of every kernel.
__device__ __forceinline__ int get_code(const uint8_t* row, int i, int bits) { return code_at(row, i, bits); }

// ------------------------------------------------------------------------------------------------
// Uneven channel groups (the KMeans clusters): a table of group starts, starts[g] = Σ_{j<g} size[j],
// starts[G] = total. Kernels build it in shared memory from the int32 sizes (no extra launch, which
// matters for a 3 µs GEMV); for very many groups the host precomputes it (kMaxSmemGroups).
// ------------------------------------------------------------------------------------------------
constexpr int kMaxSmemGroups = 2048;

// Called by ALL threads of the block (contains __syncthreads). Warp 0 scans 32 sizes at a time.
__device__ __forceinline__ const int* load_group_starts(const int* sizes, const int* global_starts, int G,
                                                        int* smem) {
  if (global_starts != nullptr) return global_starts;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int carry = 0;
    if (lane == 0) smem[0] = 0;
    for (int base = 0; base < G; base += 32) {
      int v = (base + lane < G) ? sizes[base + lane] : 0;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, v, off);
        if (lane >= off) v += n;
      }
      if (base + lane < G) smem[base + lane + 1] = carry + v;
      carry += __shfl_sync(0xffffffffu, v, 31);
    }
  }
  __syncthreads();
  return smem;
}

// Largest g in [0, G) with starts[g] <= k (k inside [0, starts[G])).
__device__ __forceinline__ int find_group(const int* starts, int G, int k) {
  int lo = 0, hi = G - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (starts[mid] <= k) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Host side: the group table for a launch. Small G: nullptr (kernels build it in shared memory);
// large G: starts computed here (one cumsum) and kept alive by `holder`.
struct GroupTable {
  const int* sizes = nullptr;
  const int* global_starts = nullptr;
  int G = 0;
  size_t smem_bytes = 0;  // dynamic shared memory the kernel needs for it
  at::Tensor holder_sizes, holder_starts;
};

inline GroupTable make_group_table(const at::Tensor& group_sizes, const at::Device& device) {
  GroupTable t;
  at::Tensor sizes = group_sizes.to(device, at::kInt).contiguous();
  t.holder_sizes = sizes;
  t.sizes = sizes.data_ptr<int>();
  t.G = static_cast<int>(sizes.numel());
  if (t.G > kMaxSmemGroups) {
    at::Tensor starts = at::zeros({t.G + 1}, sizes.options());
    starts.narrow(0, 1, t.G).copy_(at::cumsum(sizes, 0, at::kInt));
    t.holder_starts = starts;
    t.global_starts = starts.data_ptr<int>();
    t.smem_bytes = 0;
  } else {
    t.smem_bytes = sizeof(int) * (t.G + 1);
  }
  return t;
}

// ------------------------------------------------------------------------------------------------
// Conversions between the storage types and float.
// ------------------------------------------------------------------------------------------------
template <typename T> __device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Raises a kernel's dynamic shared-memory limit when a launch needs more than the default 48 KB.
// Done once per kernel and size (a host call, kept out of CUDA-graph captures after the first use).
// The kernel is a template argument so that each kernel has its own record.
constexpr size_t kDefaultSmemBytes = 48 * 1024;  // what every kernel may use without opting in

template <auto kernel>
inline void ensure_smem(size_t bytes) {
  static size_t granted = kDefaultSmemBytes;
  if (bytes > granted) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    granted = bytes;
  }
}

// Entry points shared between the .cu files (linear_aq reuses the A16 kernels and the activation quantizer).
// The run_* functions skip the checks: callers have checked the arguments already.
at::Tensor run_linear_a16_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                               const at::Tensor& zeros, const at::Tensor& group_sizes, int64_t bits,
                               const std::optional<at::Tensor>& bias);
struct GroupTable;
at::Tensor dequant_weight_cuda(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                               const GroupTable& gt, int64_t bits, int64_t K, at::ScalarType dtype);
bool gemv_applies(const at::Tensor& x, int64_t rows, int64_t K, int64_t bits);
at::Tensor run_fake_quant_act_cuda(const at::Tensor& x, const at::Tensor& act_scale, const at::Tensor& act_zero,
                                   const at::Tensor& act_group_sizes, int64_t bits);

}  // namespace rptq_cuda
