import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rptq_cli.quant.clip import group_index, search_clip
from rptq_cli.quant.grid import affine_params, expand_groups, fake_quantize, group_min_max


def _group_mse(samples, group_sizes, bits, lo_g, hi_g):
    """Squared fake-quantization error per group, computed independently of clip.py."""
    scale, zero = affine_params(lo_g, hi_g, bits)
    x_hat = fake_quantize(samples, expand_groups(scale, group_sizes), expand_groups(zero, group_sizes), bits)
    err = (x_hat - samples).double().square().sum(0)
    bounds = torch.cumsum(group_sizes.long(), 0).tolist()
    return torch.stack([err[s:e].sum() for s, e in zip([0] + bounds[:-1], bounds)])


def test_group_index():
    assert group_index(torch.tensor([2, 1, 3], dtype=torch.int32)).tolist() == [0, 0, 1, 2, 2, 2]


def test_outliers_are_clipped_and_error_drops():
    torch.manual_seed(0)
    samples = torch.randn(512, 24)
    samples[:3, 5] = 40.0  # rare spikes in group 0's channel 5
    sizes = torch.tensor([8, 16], dtype=torch.int32)
    lo, hi = samples.amin(0), samples.amax(0)
    lo_g, hi_g = search_clip(samples, sizes, 4, lo, hi)
    assert lo_g.shape == (2,) and lo_g.dtype == torch.float32
    min_lo, min_hi = group_min_max(lo, hi, sizes)
    assert hi_g[0] < 0.95 * min_hi[0]  # the spike no longer sets the grid
    clipped = _group_mse(samples, sizes, 4, lo_g, hi_g)
    plain = _group_mse(samples, sizes, 4, min_lo, min_hi)
    assert clipped[0] < 0.9 * plain[0]
    assert (clipped <= plain * (1 + 1e-9)).all()


def test_ratio_one_is_always_a_candidate():
    # uniform data fills its range: any clipping hurts, so min/max must be kept even if not offered
    samples = torch.linspace(-1, 1, 4001)[:, None].repeat(1, 4)
    sizes = torch.tensor([4], dtype=torch.int32)
    lo_g, hi_g = search_clip(samples, sizes, 8, samples.amin(0), samples.amax(0), ratios=(0.7, 0.5))
    assert lo_g.tolist() == [-1.0] and hi_g.tolist() == [1.0]


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    bits=st.sampled_from([2, 3, 4, 8]),
    tail=st.sampled_from([1.0, 3.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_never_worse_than_minmax_on_its_samples(sizes, bits, tail, seed):
    gen = torch.Generator().manual_seed(seed)
    group_sizes = torch.tensor(sizes, dtype=torch.int32)
    samples = torch.randn(64, sum(sizes), generator=gen) * torch.rand(sum(sizes), generator=gen) * tail
    lo, hi = samples.amin(0), samples.amax(0)
    lo_g, hi_g = search_clip(samples, group_sizes, bits, lo, hi)
    min_lo, min_hi = group_min_max(lo, hi, group_sizes)
    assert (lo_g >= min_lo).all() and (hi_g <= min_hi).all()  # only ever shrinks
    assert (_group_mse(samples, group_sizes, bits, lo_g, hi_g) <= _group_mse(samples, group_sizes, bits, min_lo, min_hi) * (1 + 1e-9)).all()


def test_token_clip_search_never_worse_than_min_max():
    from rptq_cli.kernels import ref_fake_quant_act_token
    from rptq_cli.quant.clip import search_token_clip
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 212, generator=g)
    x[:, :12] = torch.rand(64, 12, generator=g)  # uniform: its min/max grid is already the best
    sizes = torch.tensor([12, 200], dtype=torch.int32)
    ratio = search_token_clip(x, sizes, 4)
    mse = lambda r: (ref_fake_quant_act_token(x, sizes, r, 4) - x).square().sum()
    assert ratio[0] == 1 and mse(ratio) <= mse(torch.ones(2))
    assert ratio[1] < 1  # 200 Gaussian channels: each token's extremes are rare, clipping them pays at 4 bits
