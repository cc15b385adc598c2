"""The packed KV cache layer: appends in place, grows without losing codes, preallocates when told the length."""
import pytest
import torch

from rptq_cli import kernels
from rptq_cli.nn.attention import AttentionQuant
from rptq_cli.nn.kv_cache import PackedKVLayer
from rptq_cli.nn.quantizers import ActQuant

HEADS, HEAD_DIM = 2, 64


def spec(bits: int) -> AttentionQuant:
    sizes = torch.tensor([40, 60, 28], dtype=torch.int32)  # clusters straddle the head boundary
    lo, hi = -torch.rand(3) - 0.5, torch.rand(3) + 0.5
    return AttentionQuant(k=ActQuant.from_range(lo, hi, sizes, bits),
                          v=ActQuant.from_range(lo * 2, hi * 2, sizes, bits))


def steps(total: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A 37-token prefill, then single tokens: (keys, values) chunks of [1, HEADS, T, HEAD_DIM]."""
    g = torch.Generator().manual_seed(seed)
    sizes = [37] + [1] * (total - 37)
    return [(torch.randn(1, HEADS, t, HEAD_DIM, generator=g), torch.randn(1, HEADS, t, HEAD_DIM, generator=g))
            for t in sizes]


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("max_length", [None, 300])
def test_appended_codes_equal_packing_everything_at_once(bits, max_length):
    layer, chunks = PackedKVLayer(spec(bits), max_length), steps(300)
    for k, v in chunks:
        layer.update(k, v)
    keys, values = (torch.cat(part, dim=2) for part in zip(*chunks))
    assert layer.length == 300 and layer.capacity >= 300
    assert torch.equal(layer.keys[:, :, :300], kernels.kv_pack(keys, layer.k_scale, layer.k_zero, bits))
    assert torch.equal(layer.values[:, :, :300], kernels.kv_pack(values, layer.v_scale, layer.v_zero, bits))
    k_deq, v_deq = layer.dequantized()
    assert k_deq.shape == v_deq.shape == (1, HEADS, 300, HEAD_DIM)
    # what the cache holds, dequantized, is the keys and values on the quantizers' grids: the same numbers the
    # simulated model computes with (ActQuant over the flattened heads), reached without the packed codes
    quant = layer.spec
    assert torch.equal(k_deq, quant.k.forward_heads(keys))
    assert torch.equal(v_deq, quant.v.forward_heads(values))


def test_known_length_allocates_once():
    layer = PackedKVLayer(spec(4), max_length=300)
    buffers = set()
    for k, v in steps(300):
        layer.update(k, v)
        buffers.add(layer.keys.data_ptr())
    assert len(buffers) == 1 and layer.capacity == 512  # 300 rounded up to the 256-token growth step


def test_growth_is_geometric_with_bounded_slack():
    layer, copies, last = PackedKVLayer(spec(4)), 0, None
    for k, v in steps(2000):
        layer.update(k, v)
        copies += layer.keys.data_ptr() != last
        last = layer.keys.data_ptr()
        assert layer.capacity <= max(256, 1.5 * layer.length + 256)
    assert copies <= 8  # 256, 512, 768, 1280, 2048: a handful of copies for 2000 tokens, not one per token


def test_nbytes_counts_stored_tokens_not_the_reserve():
    layer = PackedKVLayer(spec(4), max_length=1000)
    for k, v in steps(40):
        layer.update(k, v)
    row = kernels.kv_row_bytes(HEAD_DIM, 4)
    assert layer.nbytes() == 2 * HEADS * 40 * row
    assert layer.reserved_nbytes() == 2 * HEADS * 1024 * row
