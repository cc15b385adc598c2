import warnings

import pytest
import torch

from cli_run import assert_user_error, run
from rptq_cli.errors import RptqError
from rptq_cli.quant import gptq as gptq_module
from rptq_cli.quant.gptq import GPTQ
from rptq_cli.quant.weights import rtn_quantize, weight_group_sizes


def _correlated_inputs(tokens, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    return torch.randn(tokens, 8, generator=gen) @ torch.randn(8, k, generator=gen) + 0.1 * torch.randn(tokens, k, generator=gen) @ mix


def _gptq(weight, x, group_sizes, bits=4, **kwargs):
    gptq = GPTQ(weight)
    for chunk in x.split(100):
        gptq.add_batch(chunk)
    return gptq, gptq.quantize(group_sizes, bits, **kwargs)


def _output_error(x, weight, qw):
    return (x @ (weight - qw.dequantize()).T).square().sum().item()


UNEVEN = torch.tensor([5, 60, 3, 50, 10], dtype=torch.int32)  # crosses the 16- and 128-column blocks


@pytest.mark.parametrize("group_sizes", [weight_group_sizes(128, 32), UNEVEN, weight_group_sizes(128, "channel")])
def test_gptq_beats_rtn_on_layer_output(group_sizes):
    torch.manual_seed(0)
    x = _correlated_inputs(1024, 128)
    weight = torch.randn(48, 128)
    _, qw = _gptq(weight, x, group_sizes, blocksize=16)
    gptq_err = _output_error(x, weight, qw)
    rtn_err = _output_error(x, weight, rtn_quantize(weight, group_sizes, 4))
    assert gptq_err < 0.3 * rtn_err
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 15
    assert qw.scales.dtype == torch.float16 and qw.scales.shape == (48, len(group_sizes))


def test_static_groups_and_blocksize_invariance():
    torch.manual_seed(1)
    x = _correlated_inputs(512, 128)
    weight = torch.randn(32, 128)
    _, small_blocks = _gptq(weight, x, UNEVEN, blocksize=16)
    _, one_block = _gptq(weight, x, UNEVEN, blocksize=128)
    rtn = rtn_quantize(weight, UNEVEN, 4)
    # static groups: the grid of each (row, group) is the min/max one of the original weight
    assert torch.equal(small_blocks.scales, rtn.scales) and torch.equal(small_blocks.zeros, rtn.zeros)
    # the lazy block update is exact algebra: only float rounding may flip a few codes
    assert (small_blocks.codes != one_block.codes).float().mean() < 0.01


def test_loss_is_the_output_error():
    torch.manual_seed(2)
    x = _correlated_inputs(600, 64)
    weight = torch.randn(16, 64)
    gptq = GPTQ(weight)
    gptq.add_batch(x[:250])
    gptq.add_batch(x[250:].reshape(10, 35, 64))  # any leading shape; the mean runs over tokens
    assert gptq.nsamples == 600
    torch.testing.assert_close(gptq.H, 2 / 600 * x.T @ x, rtol=1e-4, atol=1e-5)
    damp = 0.01 * gptq.H.diagonal().mean().item()
    qw = gptq.quantize(weight_group_sizes(64, 16), 3)
    delta = weight - qw.dequantize()
    expected = _output_error(x, weight, qw) / 600 + damp / 2 * delta.square().sum().item()
    assert gptq.loss == pytest.approx(expected, rel=1e-3)
    with pytest.raises(RuntimeError):
        gptq.quantize(weight_group_sizes(64, 16), 3)  # the Hessian was consumed


def test_dead_columns_quantize_to_zero():
    torch.manual_seed(3)
    x = _correlated_inputs(256, 32)
    x[:, [0, 7, 31]] = 0
    weight = torch.randn(8, 32)
    weight[:, 7] = 100.0  # a dead column must not stretch its group's grid
    _, qw = _gptq(weight, x, weight_group_sizes(32, 8))
    deq = qw.dequantize()
    assert torch.equal(deq[:, [0, 7, 31]], torch.zeros(8, 3))
    assert qw.scales[:, 0].float().max() < 1.0


def _with_hessian(hessian, weight):
    gptq = GPTQ(weight)
    gptq.H = hessian.clone()
    gptq.nsamples = 1
    return gptq


def test_cholesky_retry_with_more_damping():
    # eigenvalues 2.05 and -0.05: damping 1% of mean(diag) is not enough, 10% is
    hessian = torch.tensor([[1.0, 1.05], [1.05, 1.0]])
    gptq = _with_hessian(hessian, torch.tensor([[0.3, -0.2]]))
    with pytest.warns(RuntimeWarning, match="retrying"):
        qw = gptq.quantize(torch.tensor([2], dtype=torch.int32), 4)
    assert torch.isfinite(qw.dequantize()).all() and gptq.loss >= 0


def test_cholesky_gives_up_with_a_clear_error():
    gptq = _with_hessian(torch.tensor([[1.0, 30.0], [30.0, 1.0]]), torch.tensor([[0.3, -0.2]]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="not positive definite even with damping 10") as raised:
            gptq.quantize(torch.tensor([2], dtype=torch.int32), 4)
    # the library says what is wrong and names no CLI flag (the CLI names the fix: test_cli_names_the_fix_*)
    assert not isinstance(raised.value, RptqError) and "--" not in str(raised.value)


def test_non_finite_hessian_is_refused():
    gptq = GPTQ(torch.randn(2, 4))
    gptq.add_batch(torch.tensor([[1.0, float("inf"), 0.0, 1.0]]))
    with pytest.raises(ValueError, match="inf/NaN") as raised:
        gptq.quantize(torch.tensor([4], dtype=torch.int32), 4)
    assert not isinstance(raised.value, RptqError) and "--" not in str(raised.value)


def test_quantize_lets_go_of_the_fp_weight():
    """The layer's FP weight is freed once its linear is replaced (memory.gptq_step counts on it)."""
    weight = torch.randn(8, 32)
    gptq, _ = _gptq(weight, torch.randn(64, 32), torch.tensor([32], dtype=torch.int32))
    assert gptq.weight is None and gptq.H is None


CALIB = ["--nsamples", "2", "--seqlen", "16", "--seed", "0"]


def test_cli_names_the_fix_for_a_non_finite_hessian(tiny_opt_dir, corpus_file, tmp_path, monkeypatch):
    """A ValueError of the quant layer becomes the CLI's one-line error naming the flag that fixes it."""
    add_batch = GPTQ.add_batch
    monkeypatch.setattr(GPTQ, "add_batch", lambda self, x: add_batch(self, x * float("inf")))
    out = tmp_path / "w4"
    result = run("quantize", tiny_opt_dir, "--wbits", 4, "--calib-path", corpus_file, *CALIB, "-o", out)
    assert_user_error(result, "inf/NaN", "--dtype float32")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_names_the_fix_for_a_singular_hessian(tiny_opt_dir, corpus_file, monkeypatch):
    failed = torch.tensor(1)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda matrix, upper=False: (matrix, failed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run("eval", tiny_opt_dir, "--data-path", corpus_file, "--wbits", 4, "--calib-path", corpus_file,
                     *CALIB)
    assert_user_error(result, "not positive definite", "--nsamples", "--weight-quantizer rtn")


def test_cli_keeps_the_traceback_of_other_value_errors(tiny_opt_dir, corpus_file, monkeypatch):
    """Only the library's errors about its inputs are the user's to fix; any other ValueError is a bug in rptq."""
    def broken(*args, **kwargs):
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr(gptq_module, "expand_groups", broken)
    result = run("eval", tiny_opt_dir, "--data-path", corpus_file, "--wbits", 4, "--calib-path", corpus_file, *CALIB)
    assert result.exit_code == 1 and "this is a bug in rptq" in result.output, result.output
