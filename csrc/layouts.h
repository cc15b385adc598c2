// The packed block layouts block_q{2,3,4,8} (the checkpoint and KV cache format; specification and
// diagrams in rptq_cli/quant/pack.py) and the one row-size formula. Every C++ and CUDA kernel that reads
// or writes packed codes byte by byte goes through this header; the SIMD kernels (csrc/cpu/kernels_avx*.cpp)
// and the CUDA fast paths read whole blocks with vector loads, in the same layout.
//
// No torch header here, and every function is `static`: the CPU kernel files are compiled for different
// instruction sets, and a shared (inline, externally linked) copy compiled for AVX-512 could otherwise be
// the one an older CPU runs (see cpu/kernels.h).
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef __CUDACC__
#define RPTQ_HD __host__ __device__ __forceinline__
#else
#define RPTQ_HD inline
#endif

namespace rptq_layout {

constexpr int kBlockCodes = 32;  // codes per block, for every bit width

// block_q8: byte j = code j.
struct BlockQ8 {
  uint8_t code[32];
};
// block_q4 (ggml q4_0 order): byte j = code j | code (j + 16) << 4, j = 0..15.
struct BlockQ4 {
  uint8_t nibbles[16];
};
// block_q2: byte j = code j | code (j + 8) << 2 | code (j + 16) << 4 | code (j + 24) << 6, j = 0..7.
struct BlockQ2 {
  uint8_t crumbs[8];
};
// block_q3: a block_q2 of the low two bits, then a little-endian uint32 whose bit i is bit 2 of code i.
struct BlockQ3 {
  BlockQ2 low;
  uint8_t high[4];
};

template <int BITS> struct Block;
template <> struct Block<2> { using type = BlockQ2; };
template <> struct Block<3> { using type = BlockQ3; };
template <> struct Block<4> { using type = BlockQ4; };
template <> struct Block<8> { using type = BlockQ8; };

// A block of 32 codes of `bits` bits takes 4 * bits bytes: nothing wasted, no padding inside a block.
RPTQ_HD static constexpr int64_t block_bytes(int64_t bits) { return 4 * bits; }

static_assert(sizeof(BlockQ2) == block_bytes(2), "block_q2 is 8 bytes");
static_assert(sizeof(BlockQ3) == block_bytes(3) && offsetof(BlockQ3, high) == 8, "block_q3: 8 + 4 bytes");
static_assert(sizeof(BlockQ4) == block_bytes(4), "block_q4 is 16 bytes");
static_assert(sizeof(BlockQ8) == block_bytes(8), "block_q8 is 32 bytes");
static_assert(alignof(BlockQ3) == 1 && alignof(BlockQ4) == 1, "blocks are byte arrays: any row offset is valid");

// Bytes of a packed row of `length` codes: whole blocks, the last one padded with code 0.
RPTQ_HD static constexpr int64_t row_bytes(int64_t length, int64_t bits) {
  return (length + kBlockCodes - 1) / kBlockCodes * block_bytes(bits);
}

// Code i (0..31) of a block_q2 (the low two bits of a block_q3).
RPTQ_HD static int q2_code(const BlockQ2& b, int i) { return (b.crumbs[i & 7] >> (2 * (i >> 3))) & 3; }

// Code i of a packed row (any i < the row's length): the general path of every kernel.
RPTQ_HD static int code_at(const uint8_t* row, int64_t i, int bits) {
  const uint8_t* block = row + (i / kBlockCodes) * block_bytes(bits);
  const int j = static_cast<int>(i % kBlockCodes);
  switch (bits) {
    case 8:
      return reinterpret_cast<const BlockQ8*>(block)->code[j];
    case 4:
      return (reinterpret_cast<const BlockQ4*>(block)->nibbles[j & 15] >> (4 * (j >> 4))) & 0xF;
    case 2:
      return q2_code(*reinterpret_cast<const BlockQ2*>(block), j);
    default: {  // 3
      const BlockQ3& b = *reinterpret_cast<const BlockQ3*>(block);
      return q2_code(b.low, j) | (((b.high[j >> 3] >> (j & 7)) & 1) << 2);
    }
  }
}

// The 32 codes of one block → c[0..31].
RPTQ_HD static void unpack_block(const uint8_t* block, int bits, uint8_t* c) {
  switch (bits) {
    case 8:
      for (int j = 0; j < 32; ++j) c[j] = reinterpret_cast<const BlockQ8*>(block)->code[j];
      break;
    case 4: {
      const BlockQ4& b = *reinterpret_cast<const BlockQ4*>(block);
      for (int j = 0; j < 16; ++j) {
        c[j] = b.nibbles[j] & 15;
        c[j + 16] = b.nibbles[j] >> 4;
      }
      break;
    }
    case 2:
      for (int i = 0; i < 32; ++i) c[i] = static_cast<uint8_t>(q2_code(*reinterpret_cast<const BlockQ2*>(block), i));
      break;
    default: {  // 3
      const BlockQ3& b = *reinterpret_cast<const BlockQ3*>(block);
      const uint32_t hi = uint32_t(b.high[0]) | uint32_t(b.high[1]) << 8 | uint32_t(b.high[2]) << 16 |
                          uint32_t(b.high[3]) << 24;
      for (int i = 0; i < 32; ++i) c[i] = static_cast<uint8_t>(q2_code(b.low, i) | ((hi >> i) & 1u) << 2);
    }
  }
}

// c[0..31] (each < 2^bits) → one block of block_bytes(bits) bytes.
RPTQ_HD static void pack_q2(const uint8_t* c, BlockQ2* b) {
  for (int j = 0; j < 8; ++j)
    b->crumbs[j] = static_cast<uint8_t>((c[j] & 3) | (c[j + 8] & 3) << 2 | (c[j + 16] & 3) << 4 | (c[j + 24] & 3) << 6);
}

RPTQ_HD static void pack_block(const uint8_t* c, int bits, uint8_t* block) {
  switch (bits) {
    case 8:
      for (int j = 0; j < 32; ++j) reinterpret_cast<BlockQ8*>(block)->code[j] = c[j];
      break;
    case 4:
      for (int j = 0; j < 16; ++j)
        reinterpret_cast<BlockQ4*>(block)->nibbles[j] = static_cast<uint8_t>(c[j] | (c[j + 16] << 4));
      break;
    case 2:
      pack_q2(c, reinterpret_cast<BlockQ2*>(block));
      break;
    default: {  // 3
      BlockQ3* b = reinterpret_cast<BlockQ3*>(block);
      pack_q2(c, &b->low);
      uint32_t hi = 0;
      for (int i = 0; i < 32; ++i) hi |= uint32_t((c[i] >> 2) & 1) << i;
      for (int k = 0; k < 4; ++k) b->high[k] = static_cast<uint8_t>(hi >> (8 * k));
    }
  }
}

}  // namespace rptq_layout
