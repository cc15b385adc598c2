"""Bit packing of 2-, 3-, 4- and 8-bit codes: the on-disk and in-memory layout of weights and KV cache.

One family of blocks, ``block_q{bits}``: 32 consecutive codes of a row (along K for a weight, along the
head dim D for a KV cache row) in ``4 * bits`` bytes, nothing wasted. A row of L codes is
``ceil(L / 32)`` blocks; the last block is padded with code 0 (≤ 31 codes a row: 0.8 % at K = 4096).
The layouts are chosen so that an AVX-512 / AVX2 / CUDA kernel turns 16 (or 8) codes into int32
lanes with one load, one variable shift and one mask — no cross-lane shuffles:

``block_q8`` (32 bytes)::

    byte j = code j                                   j = 0..31

``block_q4`` (16 bytes) — ggml's q4_0 nibble order::

    byte j = code j | code (j+16) << 4                j = 0..15
    "half" h ∈ {0, 1} of the block = codes 16h..16h+15 = (byte j >> 4h) & 0xF

``block_q2`` (8 bytes)::

    byte j = code j | code (j+8) << 2 | code (j+16) << 4 | code (j+24) << 6      j = 0..7
    code i = (byte (i % 8) >> 2*(i // 8)) & 3

``block_q3`` (12 bytes) = a ``block_q2`` of the low two bits, then the third bit of every code::

    bytes 0..7  : block_q2 of (code & 3)
    bytes 8..11 : little-endian uint32, bit i = (code i >> 2) & 1
    code i = low2(i) | ((u32 >> i) & 1) << 2

Zero-points of a weight ([N, G] codes at the weight's bit width) are packed as ONE flat stream of
``N * G`` codes (:func:`pack_zeros`), so they cost ``bits`` bits each, padded once per tensor.

All functions here are pure torch on any device; they are the specification the kernels follow
(csrc/layouts.h writes the same blocks down as C++ structs).
"""
from __future__ import annotations

import torch

BLOCK = 32  #: codes per block
SUPPORTED_BITS = (2, 3, 4, 8)


def block_bytes(bits: int) -> int:
    """Bytes of one block of 32 codes: ``4 * bits``, nothing wasted (csrc/layouts.h: ``block_bytes``)."""
    _check_bits(bits)
    return 4 * bits


def packed_row_bytes(length: int, bits: int) -> int:
    """Bytes of a packed row of ``length`` codes: whole blocks, the last padded (csrc/layouts.h: ``row_bytes``)."""
    return -(-int(length) // BLOCK) * block_bytes(bits)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise ValueError(f"a code exceeds the {bits}-bit range (max {int(codes.max())} > {(1 << bits) - 1})")


def _pack2(c: torch.Tensor) -> torch.Tensor:
    """[..., 32] codes < 4 → [..., 8] bytes (block_q2)."""
    c = c.view(*c.shape[:-1], 4, 8)
    return c[..., 0, :] | (c[..., 1, :] << 2) | (c[..., 2, :] << 4) | (c[..., 3, :] << 6)


def _unpack2(b: torch.Tensor) -> torch.Tensor:
    """[..., 8] bytes → [..., 32] codes."""
    parts = [(b >> (2 * q)) & 3 for q in range(4)]
    return torch.stack(parts, -2).reshape(*b.shape[:-1], 32)



def _pack_bits(bit: torch.Tensor) -> torch.Tensor:
    """[..., 32] of 0/1 → [..., 4] bytes, byte b = Σ_i bit[8b + i] << i (little-endian uint32)."""
    shifts = torch.arange(8, device=bit.device, dtype=torch.uint8)
    bit = bit.view(*bit.shape[:-1], 4, 8) << shifts
    return bit.sum(-1, dtype=torch.int32).to(torch.uint8)


def _unpack_bits(b: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, device=b.device, dtype=torch.uint8)
    return ((b.unsqueeze(-1) >> shifts) & 1).reshape(*b.shape[:-1], 32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dim of ``codes`` (uint8 [..., L], every code < 2**bits) into ``block_q{bits}``.

    Returns uint8 [..., packed_row_bytes(L, bits)].
    """
    _check_bits(bits)
    _check_codes(codes, bits)
    length = codes.shape[-1]
    nblk = -(-length // BLOCK)
    pad = nblk * BLOCK - length
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    c = codes.contiguous().view(*codes.shape[:-1], nblk, BLOCK)
    if bits == 8:
        out = c
    elif bits == 4:
        out = c[..., :16] | (c[..., 16:] << 4)
    elif bits == 2:
        out = _pack2(c)
    else:  # 3
        out = torch.cat([_pack2(c & 3), _pack_bits((c >> 2) & 1)], -1)
    return out.reshape(*codes.shape[:-1], nblk * block_bytes(bits))


def unpack_rows(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: uint8 [..., packed_row_bytes(length)] → uint8 codes [..., length]."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_row_bytes(length, bits):
        raise ValueError(
            f"a packed row of {length} {bits}-bit codes has {packed_row_bytes(length, bits)} bytes, "
            f"got last dim {packed.shape[-1]}"
        )
    nblk = -(-length // BLOCK)
    b = packed.contiguous().view(*packed.shape[:-1], nblk, block_bytes(bits))
    if bits == 8:
        c = b
    elif bits == 4:
        c = torch.cat([b & 0xF, b >> 4], -1)
    elif bits == 2:
        c = _unpack2(b)
    else:
        c = _unpack2(b[..., :8]) | (_unpack_bits(b[..., 8:]) << 2)
    return c.reshape(*packed.shape[:-1], nblk * BLOCK)[..., :length].contiguous()


def pack_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero-points uint8 [N, G] → one flat packed stream uint8 [packed_row_bytes(N*G, bits)]."""
    if zeros.dim() != 2:
        raise ValueError(f"zeros must be 2-D [N, G], got shape {tuple(zeros.shape)}")
    return pack_rows(zeros.reshape(-1), bits)


def unpack_zeros(packed: torch.Tensor, bits: int, n: int, g: int) -> torch.Tensor:
    """Inverse of :func:`pack_zeros` → uint8 [N, G]."""
    if packed.dim() != 1:
        raise ValueError(f"packed zeros must be 1-D, got shape {tuple(packed.shape)}")
    return unpack_rows(packed, bits, n * g).view(n, g)


def ideal_bytes(n: int, k: int, g: int, bits: int) -> float:
    """Information-theoretic size of a quantized [N, K] weight with G groups a row:
    ``bits`` per weight + one fp16 scale and one ``bits``-wide zero per (row, group)."""
    return n * k * bits / 8 + n * g * (2 + bits / 8)
