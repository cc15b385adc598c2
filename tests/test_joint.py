"""q/k/v and gate/up as one kernel call (nn/joint.py): the same outputs as the layers one by one, no byte twice,
and the layers one by one again wherever a joint layer would be wrong or would hide a call."""
import pytest
import torch

from rptq_cli.config import QuantConfig
from rptq_cli.export import load_quantized
from rptq_cli.nn.joint import JointLinear, keep_apart, run_joint

from quantized import SMALL, corpus_ids, quantized_checkpoint


@pytest.fixture(scope="module", params=[
    ("qwen2", QuantConfig(wbits=4, abits=16, clusters=SMALL)),  # linear_a16; q/k/v biases
    ("llama", QuantConfig(wbits=4, abits=4, clusters=SMALL)),  # linear_aq on the shared input grid
], ids=["qwen2-w4a16", "llama-w4a4"])
def checkpoint(request, tmp_path_factory):
    family, config = request.param
    return quantized_checkpoint(tmp_path_factory.mktemp(family) / "ckpt", family, config)


def parts(layer):
    """(owner, key, layers) of a decoder layer's two joint layers."""
    attn, mlp = layer.self_attn, layer.mlp
    return [(attn, "_rptq_qkv", (attn.q_proj, attn.k_proj, attn.v_proj)),
            (mlp, "_rptq_gate_up", (mlp.gate_proj, mlp.up_proj))]


def one_by_one(layers, x):
    return tuple(layer(x) for layer in layers)


@pytest.mark.parametrize("tokens", [1, 5])
def test_joint_layers_compute_the_layers_and_hold_no_copy(checkpoint, tokens):
    model, _ = load_quantized(checkpoint)
    x = torch.randn(1, tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        for owner, key, layers in parts(model.model.layers[0]):
            want = one_by_one(layers, x)
            got = run_joint(owner, key, layers, x)
            joint = owner.__dict__[key]
            assert isinstance(joint, JointLinear)
            for g, w in zip(got, want):
                assert torch.equal(g, w)  # each row is computed as it was: same codes, same input grid
            rows = 0
            for layer in layers:  # each layer's buffers are its rows of the joint ones
                for name in ("qweight", "scales", "zeros"):
                    own, shared = getattr(layer, name), getattr(joint.linear, name)
                    assert own.untyped_storage().data_ptr() == shared.untyped_storage().data_ptr()
                    assert torch.equal(own, shared[rows:rows + layer.out_features])
                rows += layer.out_features


def test_a_replaced_tensor_rebuilds_the_joint_layer(checkpoint):
    model, _ = load_quantized(checkpoint)
    owner, key, layers = parts(model.model.layers[0])[0]
    x = torch.randn(1, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        run_joint(owner, key, layers, x)
        first = owner.__dict__[key]
        layers[1].scales = layers[1].scales * 2  # a new tensor: the joint layer no longer computes k_proj
        got = run_joint(owner, key, layers, x)
        assert owner.__dict__[key] is not first
        for g, w in zip(got, one_by_one(layers, x)):
            assert torch.equal(g, w)


def test_an_in_place_write_reaches_the_joint_layer(checkpoint):
    model, _ = load_quantized(checkpoint)
    owner, key, layers = parts(model.model.layers[0])[0]
    x = torch.randn(1, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = run_joint(owner, key, layers, x)
        layers[0].scales.mul_(2)  # as load_state_dict writes: into the shared storage, and the scale cache follows
        after = run_joint(owner, key, layers, x)
    assert not torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    with torch.no_grad():
        assert torch.equal(after[0], layers[0](x))


def test_hooked_layers_run_one_by_one(checkpoint):
    model, _ = load_quantized(checkpoint)
    owner, key, layers = parts(model.model.layers[0])[1]
    calls = []
    layers[1].register_forward_hook(lambda module, args, out: calls.append(out.shape))
    x = torch.randn(1, 2, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = run_joint(owner, key, layers, x)
    assert owner.__dict__[key] is False and len(calls) == 1
    for g, w in zip(got, one_by_one(layers, x)):
        assert torch.equal(g, w)


def test_decode_through_joint_layers_is_the_decode_without(checkpoint):
    joint, tok = load_quantized(checkpoint)
    separate, _ = load_quantized(checkpoint)
    for owner, key, _ in (part for layer in separate.model.layers for part in parts(layer)):
        owner.__dict__[key] = False  # never joined
    ids = corpus_ids(tok)[:, :12]
    with torch.no_grad():
        outs = [model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
                for model in (joint, separate)]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert torch.equal(torch.stack(outs[0].logits), torch.stack(outs[1].logits))


def test_a_model_kept_apart_runs_its_layers_one_by_one(checkpoint):
    # what place_model does for accelerate's device maps, whose hooks swap each layer's tensors in and out
    model, tok = load_quantized(checkpoint)
    keep_apart(model)
    with torch.no_grad():
        model(corpus_ids(tok)[:, :4])
    assert all(owner.__dict__[key] is False for layer in model.model.layers for owner, key, _ in parts(layer))


def test_a_joint_layer_built_under_inference_mode_holds_ordinary_tensors(checkpoint):
    # rptq eval runs under inference mode; the layers' buffers must stay writable in place and their scales cached
    model, _ = load_quantized(checkpoint)
    owner, key, layers = parts(model.model.layers[0])[0]
    x = torch.randn(1, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        got = run_joint(owner, key, layers, x)
    assert not any(t.is_inference() for layer in layers for t in (layer.qweight, layer.scales, layer.zeros))
    layers[0].scales.mul_(1)  # allowed: an ordinary tensor
    with torch.no_grad():
        for g, w in zip(got, one_by_one(layers, x)):
            assert torch.equal(g, w)
