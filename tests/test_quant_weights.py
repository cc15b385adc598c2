import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rptq_cli.quant.grid import expand_groups, quantize
from rptq_cli.quant.weights import QuantizedWeight, fp16_affine_params, rtn_quantize, weight_group_sizes


def _check_rtn(weight, group_sizes, bits):
    qw = rtn_quantize(weight, group_sizes, bits)
    n, k = weight.shape
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == (n, k)
    assert qw.scales.dtype == torch.float16 and qw.scales.shape == (n, len(group_sizes))
    assert qw.zeros.dtype == torch.uint8 and qw.group_sizes.dtype == torch.int32
    assert int(qw.codes.max()) <= 2**bits - 1 and int(qw.zeros.max()) <= 2**bits - 1
    scale = expand_groups(qw.scales.float(), qw.group_sizes)
    # every value is within half a step of the stored (fp16) grid: the grid covers [min, max]
    err = (qw.dequantize() - weight.float()).abs()
    assert (err <= scale / 2 * (1 + 1e-5) + 1e-7).all()
    # the codes are those of the stored scale, so a checkpoint reload dequantizes to the same values
    zero = expand_groups(qw.zeros, qw.group_sizes)
    assert torch.equal(quantize(weight.float(), scale, zero, bits), qw.codes)
    return qw


def test_weight_group_sizes():
    clusters = torch.tensor([3, 10, 7], dtype=torch.int32)
    assert weight_group_sizes(20, "cluster", clusters).tolist() == [3, 10, 7]
    assert weight_group_sizes(20, "channel").tolist() == [20]
    assert weight_group_sizes(100, 32).tolist() == [32, 32, 32, 4]
    assert weight_group_sizes(64, "32").tolist() == [32, 32]
    assert weight_group_sizes(20, 128).tolist() == [20]
    assert weight_group_sizes(100, 32).dtype == torch.int32
    with pytest.raises(ValueError, match="calibrated for another model"):
        weight_group_sizes(21, "cluster", clusters)
    with pytest.raises(ValueError, match="calibrated for another model"):
        weight_group_sizes(20, "cluster", torch.tensor([21, -1], dtype=torch.int32))
    with pytest.raises(ValueError, match="group size"):
        weight_group_sizes(20, "g128")
    with pytest.raises(ValueError, match="'g128'"):
        weight_group_sizes(20, "g128")
    with pytest.raises(ValueError, match="0"):
        weight_group_sizes(20, 0)
    with pytest.raises(ValueError, match="input_cluster_sizes"):
        weight_group_sizes(20, "cluster")


def test_rtn_uneven_groups_error_and_codes():
    torch.manual_seed(0)
    w = torch.randn(16, 50)
    w[:, 3:13] *= 20  # one loud group must not widen its neighbours' grids
    sizes = torch.tensor([3, 10, 30, 7], dtype=torch.int32)
    for bits in (2, 3, 4, 8):
        qw = _check_rtn(w, sizes, bits)
    # 8-bit group scale is exactly the fp16-rounded (max - min) / 255 of that group alone
    g2 = w[:, 13:43]
    expected = ((g2.amax(1).clamp_min(0) - g2.amin(1).clamp_max(0)) / 255).half().float()
    got = qw.scales[:, 2].float()
    assert (got >= expected).all() and (got <= expected * (1 + 2**-10)).all()


def test_fp16_scale_rounded_up_and_zero_from_rounded_scale():
    lo = torch.tensor([-1.0, -0.3, 0.0, 0.0, -1e-12])
    hi = torch.tensor([1.0, 0.7, 0.0, 3e-9, 1e-12])
    scale, zero = fp16_affine_params(lo, hi, 4)
    assert torch.equal(scale.half().float(), scale)  # exactly a float16
    assert (scale * 15 >= (hi.clamp_min(0) - lo.clamp_max(0))).all()  # still covers the range
    assert (scale > 0).all()  # a zero range must not give a float16 scale of 0 (division by zero)
    assert torch.equal(zero, torch.round(-lo.clamp_max(0) / scale).int())


def test_rtn_zero_weight_is_exact():
    w = torch.zeros(4, 8)
    w[0, 0] = 7.5  # scale 0.5: exact in float16
    qw = _check_rtn(w, torch.tensor([4, 4], dtype=torch.int32), 4)
    assert torch.isfinite(qw.dequantize()).all()
    assert torch.equal(qw.dequantize(), w)  # 0 and the max are both on the grid


def test_dequantize_matches_formula():
    qw = QuantizedWeight(
        codes=torch.tensor([[0, 15, 7]], dtype=torch.uint8),
        scales=torch.tensor([[0.5, 2.0]], dtype=torch.float16),
        zeros=torch.tensor([[3, 1]], dtype=torch.uint8),
        group_sizes=torch.tensor([2, 1], dtype=torch.int32),
        bits=4,
    )
    assert qw.dequantize().tolist() == [[-1.5, 6.0, 12.0]]


def test_rtn_clip_reduces_error_with_heavy_tails():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((64, 256))
    sizes = weight_group_sizes(256, 64)
    plain = rtn_quantize(w, sizes, 3)
    clipped = rtn_quantize(w, sizes, 3, clip=True)
    err_plain = (plain.dequantize() - w).square().sum()
    err_clip = (clipped.dequantize() - w).square().sum()
    assert err_clip < 0.95 * err_plain
    assert int(clipped.codes.max()) <= 7
    # clipping only ever shrinks a range: no scale grows
    assert (clipped.scales.float() <= plain.scales.float()).all()


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    bits=st.sampled_from([2, 3, 4, 8]),
    magnitude=st.sampled_from([1e-6, 1e-2, 1.0, 300.0]),
    seed=st.integers(0, 2**16),
)
def test_rtn_property(rows, sizes, bits, magnitude, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, sum(sizes), generator=gen) * magnitude
    _check_rtn(w, torch.tensor(sizes, dtype=torch.int32), bits)


def test_cli_names_the_fix_for_clusters_of_another_model():
    from rptq_cli.cli import _fix_for_library_error
    with pytest.raises(ValueError) as raised:
        weight_group_sizes(21, "cluster", torch.tensor([3, 10, 7], dtype=torch.int32))
    assert "re-run `rptq calibrate`" in _fix_for_library_error(raised.value)
    with pytest.raises(ValueError) as raised:  # a caller's mistake, not the user's: no fix, a bug report
        weight_group_sizes(20, "cluster")
    assert _fix_for_library_error(raised.value) is None
