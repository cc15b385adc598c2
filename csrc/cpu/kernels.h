// The CPU kernels of the rptq:: ops, behind one table of function pointers per instruction set.
//
// kernels_scalar.cpp, kernels_avx2.cpp and kernels_avx512.cpp compile the same portable code
// (generic.inc) for their ISA (with `#pragma GCC target`); kernels_avx2.cpp and kernels_avx512.cpp
// replace the hot entries (the integer W·A16 GEMV, weight dequantization, decode attention and the integer
// GEMM) with intrinsics. ops.cpp picks the
// table at run time from the processor's flags, so one build runs on any x86-64.
//
// Everything here works on raw, contiguous, already validated buffers (ops.cpp checks the tensors);
// this header and the kernel files include no torch header, so nothing compiled for AVX-512 can leak
// into code that runs on an older CPU through a shared inline function.
//
// Conventions: x float32 row-major [M, K]; weights in the block_q{bits} layout of
// rptq_cli/quant/pack.py and ../layouts.h ([N, row_bytes(K)]); scales float32 [N, G]; zeros uint8 [N, G];
// group_sizes int32 [G] (Σ = K); KV rows [B, H, S, row_bytes(D)].
#pragma once
#include <cstdint>

#include "../layouts.h"

namespace rptq_cpu {

using rptq_layout::block_bytes;
using rptq_layout::row_bytes;

// Rows of x at or below this run the GEMV kernels (decode: the weight stream dominates); above, the GEMM
// paths (prefill). The GEMV kernels are compiled for 1..kGemvMaxRows rows (generic.inc: with_rows).
constexpr int64_t kGemvMaxRows = 8;
// The integer (VNNI/AMX) GEMM takes weights of at most this many bits: their codes (< 16) are a valid s8
// operand of vpdpbusd.
constexpr int kIntGemmMaxBits = 4;

struct KernelTable {
  const char* isa;
  void (*pack_rows)(const uint8_t* codes, int64_t rows, int64_t len, int bits, uint8_t* out);
  void (*unpack_rows)(const uint8_t* packed, int64_t rows, int64_t len, int bits, uint8_t* out);
  // float32 W [N, K] (for the prefill GEMM fallback and tests)
  void (*dequant_weight)(const uint8_t* qw, const float* scales, const uint8_t* zeros, const int32_t* gs,
                         int G, int64_t N, int64_t K, int bits, float* out);
  void (*linear_a16)(const float* x, int64_t M, const uint8_t* qw, const float* scales, const uint8_t* zeros,
                     const int32_t* gs, int G, int64_t N, int64_t K, int bits, const float* bias, float* y);
  // integer GEMM (VNNI, AMX, AVX2's vpmaddubsw) for > kGemvMaxRows rows and ≤ kIntGemmMaxBits-bit weights;
  // null where the ISA has none (ops.cpp then runs fake_quant(x) through linear_a16, the same math). Throws std::invalid_argument
  // when called outside that contract (it never leaves y unwritten).
  void (*linear_aq)(const float* x, int64_t M, const uint8_t* qw, const float* scales, const uint8_t* zeros,
                    const int32_t* gs, int G, int64_t N, int64_t K, int bits, const float* act_scale,
                    const int32_t* act_zero, int act_bits, const float* bias, float* y);
  // linear_aq for ≤ kGemvMaxRows rows (the integer GEMV), on the activations' integer codes (the same integers as
  // the reference); null where the ISA has none (ops.cpp then runs fake_quant(x) through linear_a16)
  void (*gemv_aq)(const float* x, int64_t M, const uint8_t* qw, const float* scales, const uint8_t* zeros,
                  const int32_t* gs, int G, int64_t N, int64_t K, int bits, const float* act_scale,
                  const int32_t* act_zero, int act_bits, const float* bias, float* y);
  // fake-quantized x [rows, C] on static per-group grids
  void (*fake_quant_act)(const float* x, int64_t rows, int64_t C, const float* scale, const int32_t* zero,
                         const int32_t* gs, int G, int bits, float* fq);
  // fake-quantized x [rows, C] on per-token grids: each row's own (scale, zero) per group from its min/max
  // times the group's clip ratio
  void (*quantize_act_token)(const float* x, int64_t rows, int64_t C, const int32_t* gs, const float* clip, int G,
                             int bits, float* fq);
  void (*reorder_norm)(const float* x, int64_t rows, int64_t C, const int64_t* perm, const float* w,
                       const float* b, float eps, int rms, float* y);
  // x [B*H slabs of T rows of D] → rows of packed codes; slab i (head i % H) written at out + i*out_slab
  void (*kv_pack)(const float* x, int64_t BH, int64_t H, int64_t T, int64_t D, const float* scale,
                  const int32_t* zero, int bits, uint8_t* out, int64_t out_slab);
  void (*kv_unpack)(const uint8_t* packed, int64_t BH, int64_t H, int64_t T, int64_t D, const float* scale,
                    const int32_t* zero, int bits, float* out);
  void (*decode_attention)(const float* q, int64_t B, int64_t Hq, int64_t Tq, int64_t D, const uint8_t* kp,
                           const uint8_t* vp, int64_t Hkv, int64_t S, const float* k_scale,
                           const int32_t* k_zero, const float* v_scale, const int32_t* v_zero, int bits,
                           int64_t kv_len, float scaling, int p_bits, float* out);
  // The KV cache on per-token grids (kv_token.inc). Rows as for kv_pack: slab i of B·H is head i % H; groups
  // int32 [H, G] (Σ per row = D, empty groups allowed), clip float32 [H, G]; per-token grids float16 bits /
  // uint8 [slab, S, G].
  void (*kv_token_pack)(const float* x, int64_t BH, int64_t H, int64_t T, int64_t D, const int32_t* groups,
                        const float* clip, int64_t G, int bits, uint8_t* codes, int64_t codes_slab, uint16_t* scale,
                        uint8_t* zero, int64_t params_slab);
  void (*kv_token_unpack)(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, int64_t BH, int64_t H,
                          int64_t T, int64_t D, const int32_t* groups, int64_t G, int bits, float* out);
  void (*kv_token_attention)(const float* q, int64_t B, int64_t Hq, int64_t Tq, int64_t D, const uint8_t* kp,
                             const uint8_t* vp, int64_t Hkv, int64_t S, const uint16_t* k_scale,
                             const uint8_t* k_zero, const uint16_t* v_scale, const uint8_t* v_zero,
                             const int32_t* k_groups, int64_t Gk, const int32_t* v_groups, int64_t Gv, int bits,
                             int64_t kv_len, float scaling, int p_bits, float* out);
};

void fill_scalar(KernelTable* t);
void fill_avx2(KernelTable* t);
void fill_avx512(KernelTable* t);  // requires avx512f/bw/vl + avx512vnni
void fill_amx(KernelTable* t);     // avx512 + the AMX int8 GEMM; requires amx_usable()
bool amx_usable();                 // AMX-INT8 present and the OS granted the tile state

}  // namespace rptq_cpu
