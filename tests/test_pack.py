"""Bit packing (rptq_cli/quant/pack.py): identity, layout, sizes, misuse."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rptq_cli import kernels
from rptq_cli.quant import pack
from rptq_cli.quant.pack import ideal_bytes, pack_rows, pack_zeros, packed_row_bytes, unpack_rows, unpack_zeros

BITS = (2, 3, 4, 8)


@st.composite
def codes_and_bits(draw):
    bits = draw(st.sampled_from(BITS))
    rows = draw(st.integers(1, 5))
    length = draw(st.integers(1, 130))
    kind = draw(st.sampled_from(["random", "zeros", "max", "alternating"]))
    seed = draw(st.integers(0, 2**31 - 1))
    qmax = (1 << bits) - 1
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        codes = torch.randint(0, qmax + 1, (rows, length), generator=g, dtype=torch.uint8)
    elif kind == "zeros":
        codes = torch.zeros(rows, length, dtype=torch.uint8)
    elif kind == "max":
        codes = torch.full((rows, length), qmax, dtype=torch.uint8)
    else:
        codes = (torch.arange(rows * length).view(rows, length) % 2 * qmax).to(torch.uint8)
    return codes, bits


@settings(max_examples=150, deadline=None)
@given(codes_and_bits())
def test_pack_unpack_identity(cb):
    codes, bits = cb
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (codes.shape[0], packed_row_bytes(codes.shape[1], bits))
    assert torch.equal(unpack_rows(packed, bits, codes.shape[1]), codes)


@settings(max_examples=60, deadline=None)
@given(codes_and_bits())
def test_zeros_identity(cb):
    zeros, bits = cb
    packed = pack_zeros(zeros, bits)
    assert packed.dim() == 1 and packed.numel() == packed_row_bytes(zeros.numel(), bits)
    assert torch.equal(unpack_zeros(packed, bits, *zeros.shape), zeros)


def test_pack_rows_any_leading_shape():
    codes = torch.randint(0, 8, (2, 3, 4, 45), dtype=torch.uint8)
    assert torch.equal(unpack_rows(pack_rows(codes, 3), 3, 45), codes)


def test_block_layouts_documented():
    """The byte layouts written in pack.py's docstring."""
    c = torch.arange(32, dtype=torch.uint8)
    assert pack_rows(c, 8).tolist() == c.tolist()
    p4 = pack_rows(c % 16, 4)
    assert p4.numel() == 16 and all(p4[j] == (j % 16) | ((j + 16) % 16) << 4 for j in range(16))
    c2 = c % 4
    p2 = pack_rows(c2, 2)
    assert p2.numel() == 8
    for i in range(32):
        assert (int(p2[i % 8]) >> 2 * (i // 8)) & 3 == c2[i]
    c3 = (c * 5) % 8
    p3 = pack_rows(c3, 3)
    assert p3.numel() == 12
    hi = int.from_bytes(bytes(p3[8:].tolist()), "little")
    for i in range(32):
        low = (int(p3[i % 8]) >> 2 * (i // 8)) & 3
        assert low | ((hi >> i) & 1) << 2 == c3[i]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k,g", [(4096, 4096, 32), (11008, 4096, 32), (4096, 11008, 32), (4096, 4096, 1),
                                   (4096, 4096, 32), (4096, 4096, 4096 // 128), (5120, 13824, 32)])
def test_checkpoint_size_within_2_percent(bits, n, k, g):
    """The bytes the packers actually write (one weight row, measured, times N; the zero stream; fp16 scales)."""
    row = pack_rows(torch.zeros(1, k, dtype=torch.uint8), bits).numel()
    zeros = pack_zeros(torch.zeros(n, g, dtype=torch.uint8), bits).numel()
    stored = n * row + zeros + n * g * torch.finfo(torch.float16).bits // 8
    assert stored <= 1.02 * ideal_bytes(n, k, g, bits)


def test_three_bit_wastes_nothing():
    assert packed_row_bytes(32, 3) == 12 and packed_row_bytes(4096, 3) == 4096 * 3 // 8


@pytest.mark.parametrize("bad", [
    lambda: pack_rows(torch.zeros(2, 3, dtype=torch.int32), 4),
    lambda: pack_rows(torch.full((2, 3), 16, dtype=torch.uint8), 4),
    lambda: pack_rows(torch.zeros(2, 3, dtype=torch.uint8), 5),
    lambda: kernels.pack_weight(torch.zeros(6, dtype=torch.uint8), 4),  # a weight is 2-D
    lambda: unpack_rows(torch.zeros(2, 15, dtype=torch.uint8), 4, 32),
    lambda: kernels.unpack_weight(torch.zeros(3, 16, dtype=torch.uint8), 4, 2, 32),
    lambda: unpack_rows(torch.zeros(2, 16, dtype=torch.int8), 4, 32),
    lambda: unpack_zeros(torch.zeros(2, 16, dtype=torch.uint8), 4, 2, 16),
])
def test_misuse_raises(bad):
    with pytest.raises(ValueError):
        bad()


def test_block_constants():
    assert pack.BLOCK == 32 and [pack.block_bytes(b) for b in BITS] == [8, 12, 16, 32]
    assert [pack_rows(torch.zeros(pack.BLOCK, dtype=torch.uint8), b).numel() for b in BITS] == [8, 12, 16, 32]
