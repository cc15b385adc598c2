"""Bad arguments for every rptq:: op, each with the words its ValueError must contain.

Every case starts from a valid call and changes one argument; tests/test_kernels_cpu.py and
tests/test_kernels_cuda.py run them through ``torch.ops.rptq`` on every backend they have (the checked
reference, the compiled CPU kernels, the CUDA kernels), so all backends reject the same calls the same way.
"""
from __future__ import annotations

import torch

from rptq_cli.quant import grid
from rptq_cli.quant.pack import pack_rows, packed_row_bytes

N, K, BITS = 8, 64, 4
GROUPS = [20, 30, 14]


def _valid(device: str) -> dict:
    """Valid arguments of every op (on ``device``), built from one small layer and one small KV cache."""
    g = torch.Generator().manual_seed(0)
    gs = torch.tensor(GROUPS, dtype=torch.int32)
    codes = torch.randint(0, 1 << BITS, (N, K), generator=g, dtype=torch.uint8)
    x = torch.randn(2, K, generator=g)
    scale, zero = grid.affine_params(-torch.ones(len(GROUPS)), torch.ones(len(GROUPS)), 8)
    heads, d = 2, K
    kv_scale = torch.rand(heads, d, generator=g) * 0.1 + 0.01
    kv_zero = torch.full((heads, d), 8, dtype=torch.int32)
    cache = torch.zeros(1, heads, 4, packed_row_bytes(d, BITS), dtype=torch.uint8)
    args = dict(
        codes=codes, packed=pack_rows(codes, BITS), x=x, gs=gs,
        scales=torch.rand(N, len(GROUPS), generator=g).half() * 0.01 + 0.001,
        zeros=torch.randint(0, 16, (N, len(GROUPS)), generator=g, dtype=torch.uint8),
        act_scale=scale, act_zero=zero, clip=torch.ones(len(GROUPS)),
        perm=torch.randperm(K, generator=g), weight=torch.ones(K), kv_x=torch.randn(1, heads, 3, d, generator=g),
        kv_scale=kv_scale, kv_zero=kv_zero, cache=cache, q=torch.randn(1, 4, 1, d, generator=g),
        # per-token grids: heads × 3 groups (the second head's last one empty), grids [1, heads, 4, 3]
        kv_groups=torch.tensor([[20, 30, 14], [40, 24, 0]], dtype=torch.int32), kv_clip=torch.ones(heads, 3),
        grid_scale=torch.full((1, heads, 4, 3), 0.1, dtype=torch.float16),
        grid_zero=torch.full((1, heads, 4, 3), 8, dtype=torch.uint8),
    )
    return {k: v.to(device) for k, v in args.items()}


def bad_calls(device: str = "cpu") -> list[tuple[str, str, tuple, str]]:
    """(case id, op name, positional arguments, regex the error message must match)."""
    a = _valid(device)
    x, gs, q, c = a["x"], a["gs"], a["q"], a["cache"]
    s, z, ks, kz = a["act_scale"], a["act_zero"], a["kv_scale"], a["kv_zero"]
    strided_cache = torch.zeros(c.shape[0], c.shape[1], 2 * c.shape[2], c.shape[3], dtype=torch.uint8,
                                device=device)[:, :, ::2]

    def linear(**change):
        w = dict(x=x, qweight=a["packed"], scales=a["scales"], zeros=a["zeros"], group_sizes=gs, bits=BITS, bias=None)
        w.update(change)
        return (w["x"], w["qweight"], w["scales"], w["zeros"], w["group_sizes"], w["bits"], w["bias"])

    def linear_aq(act_scale=s, act_zero=z, act_bits=8, **change):
        w = linear(**change)
        return (*w[:6], act_scale, act_zero, act_bits, w[6])

    def attention(q=q, k=c, v=c, k_scale=ks, k_zero=kz, bits=BITS, kv_len=4, p_bits=16):
        return (q, k, v, k_scale, k_zero, ks, kz, bits, kv_len, 0.1, p_bits)

    kg, kc, gsc, gz = a["kv_groups"], a["kv_clip"], a["grid_scale"], a["grid_zero"]

    def append_token(cache=c, scale=gsc, zero=gz, x=a["kv_x"][:, :, :1], groups=kg, clip=kc, bits=BITS, pos=0):
        return (cache, scale, zero, x, groups, clip, bits, pos)

    def attention_token(q=q, k=c, v=c, k_scale=gsc, k_zero=gz, k_groups=kg, bits=BITS, kv_len=4, p_bits=16):
        return (q, k, v, k_scale, k_zero, gsc, gz, k_groups, kg, bits, kv_len, 0.1, p_bits)

    cases = [
        ("pack-dtype", "pack_weight", (a["codes"].int(), BITS), "uint8"),
        ("pack-1d", "pack_weight", (a["codes"][0], BITS), "codes"),
        ("pack-range", "pack_weight", (a["codes"] | 16, BITS), "range"),
        ("pack-bits", "pack_weight", (a["codes"], 5), "bits"),
        ("unpack-bytes", "unpack_weight", (a["packed"][:, :-1], BITS, N, K), "packed"),
        ("unpack-rows", "unpack_weight", (a["packed"], BITS, N + 1, K), "packed"),
        ("unpack-negative", "unpack_weight", (a["packed"], BITS, N, -1), "negative"),
        ("a16-x-int", "linear_a16", linear(x=x.int()), "float"),
        ("a16-x-width", "linear_a16", linear(x=torch.randn(2, 100, device=device)), "qweight"),
        ("a16-qweight-bytes", "linear_a16", linear(qweight=a["packed"][:, :-1]), "qweight"),
        ("a16-qweight-dtype", "linear_a16", linear(qweight=a["packed"].int()), "uint8"),
        ("a16-scales-dtype", "linear_a16", linear(scales=a["scales"].double()), "scales"),
        ("a16-zeros", "linear_a16", linear(zeros=a["zeros"][:, :-1]), "zeros"),
        ("a16-group-sum", "linear_a16", linear(group_sizes=gs + 1), "sum"),
        ("a16-group-zero", "linear_a16", linear(group_sizes=torch.cat([gs[:1] * 0, gs[1:]])), "positive"),
        ("a16-group-count", "linear_a16", linear(group_sizes=gs[1:]), "group"),
        ("a16-group-dtype", "linear_a16", linear(group_sizes=gs.float()), "group_sizes"),
        ("a16-bits", "linear_a16", linear(bits=5), "bits"),
        ("a16-bias", "linear_a16", linear(bias=torch.zeros(N - 1, device=device)), "bias"),
        ("aq-act-scale", "linear_aq", linear_aq(act_scale=s[:-1]), "act_scale"),
        ("aq-act-zero", "linear_aq", linear_aq(act_zero=z.float()), "act_zero"),
        ("aq-act-bits", "linear_aq", linear_aq(act_bits=9), "bits"),
        ("aq-group-sum", "linear_aq", linear_aq(group_sizes=gs + 1), "sum"),
        ("aq-bits", "linear_aq", linear_aq(bits=5), "bits"),
        ("fq-x-int", "fake_quant_act", (x.int(), s, z, gs, 8), "float"),
        ("fq-act-scale", "fake_quant_act", (x, s[:-1], z, gs, 8), "act_scale"),
        ("fq-group-sum", "fake_quant_act", (x, s, z, gs + 1, 8), "sum"),
        ("fq-bits", "fake_quant_act", (x, s, z, gs, 0), "bits"),
        ("token-group-sum", "fake_quant_act_token", (x, gs[:-1], a["clip"][:-1], 8), "sum"),
        ("token-bits", "fake_quant_act_token", (x, gs, a["clip"], 9), "bits"),
        ("token-clip", "fake_quant_act_token", (x, gs, a["clip"][:-1], 8), "clip"),
        ("norm-perm-range", "reorder_norm", (x, a["perm"] + 1, a["weight"], None, 1e-5, False), "perm"),
        ("norm-perm-negative", "reorder_norm", (x, a["perm"] - 1, a["weight"], None, 1e-5, True), "perm"),
        ("norm-perm-length", "reorder_norm", (x, a["perm"][1:], a["weight"], None, 1e-5, False), "perm"),
        ("norm-weight", "reorder_norm", (x, a["perm"], a["weight"][1:], None, 1e-5, False), "weight"),
        ("norm-bias", "reorder_norm", (x, a["perm"], a["weight"], a["weight"][1:], 1e-5, False), "bias"),
        ("norm-x-int", "reorder_norm", (x.int(), a["perm"], a["weight"], None, 1e-5, False), "float"),
        ("kvpack-x-3d", "kv_pack", (a["kv_x"][0], ks, kz, BITS), "x must"),
        ("kvpack-scale", "kv_pack", (a["kv_x"], ks[:1], kz, BITS), "scale"),
        ("kvpack-zero", "kv_pack", (a["kv_x"], ks, kz.float(), BITS), "zero"),
        ("kvpack-bits", "kv_pack", (a["kv_x"], ks, kz, 5), "bits"),
        ("kvunpack-bytes", "kv_unpack", (c[..., :-1], ks, kz, BITS, K), "packed"),
        ("kvunpack-scale", "kv_unpack", (c, ks[:, :-1], kz, BITS, K), "scale"),
        ("kvunpack-bits", "kv_unpack", (c, ks, kz, 5, K), "bits"),
        ("append-fit", "kv_append", (c, a["kv_x"], ks, kz, BITS, 2), "fit"),
        ("append-negative-pos", "kv_append", (c, a["kv_x"], ks, kz, BITS, -1), "fit"),
        ("append-cache-shape", "kv_append", (c[..., :-1], a["kv_x"][:, :, :1], ks, kz, BITS, 0), "cache"),
        ("append-cache-strided", "kv_append", (strided_cache, a["kv_x"][:, :, :1], ks, kz, BITS, 0), "contiguous"),
        ("append-zero", "kv_append", (c, a["kv_x"][:, :, :1], ks, kz[:1], BITS, 0), "zero"),
        ("attn-heads", "decode_attention", attention(q=q[:, :3]), "multiple"),
        ("attn-kv-len", "decode_attention", attention(kv_len=5), "kv_len"),
        ("attn-tq", "decode_attention", attention(q=torch.cat([q] * 5, 2), kv_len=4), "kv_len"),
        ("attn-scale", "decode_attention", attention(k_scale=ks[:1]), "scale"),
        ("attn-zero", "decode_attention", attention(k_zero=kz.float()), "zero"),
        ("attn-k-v-differ", "decode_attention", attention(v=c[:, :, :3]), "differ"),
        ("attn-row-bytes", "decode_attention", attention(k=c[..., :-1], v=c[..., :-1]), "k_packed"),
        ("attn-p-bits", "decode_attention", attention(p_bits=17), "p_bits"),
        ("attn-bits", "decode_attention", attention(bits=5), "bits"),
        ("tappend-fit", "kv_append_token", append_token(x=a["kv_x"], pos=2), "fit"),
        ("tappend-group-sum", "kv_append_token", append_token(groups=kg + 1), "sum"),
        ("tappend-group-negative", "kv_append_token",
         append_token(groups=torch.tensor([[20, 30, 14], [66, -2, 0]], dtype=torch.int32, device=device)), "negative"),
        ("tappend-group-heads", "kv_append_token", append_token(groups=kg[:1], clip=kc[:1]), "group_sizes"),
        ("tappend-clip", "kv_append_token", append_token(clip=kc[:, :2]), "clip"),
        ("tappend-scale-dtype", "kv_append_token", append_token(scale=gsc.float()), "scale"),
        ("tappend-zero-shape", "kv_append_token", append_token(zero=gz[:, :, :3]), "zero"),
        ("tappend-cache-strided", "kv_append_token", append_token(cache=strided_cache), "contiguous"),
        ("tappend-bits", "kv_append_token", append_token(bits=5), "bits"),
        ("tunpack-bytes", "kv_unpack_token", (c[..., :-1], gsc, gz, kg, BITS, K), "packed"),
        ("tunpack-scale", "kv_unpack_token", (c, gsc[:, :, :3], gz, kg, BITS, K), "scale"),
        ("tunpack-group-sum", "kv_unpack_token", (c, gsc, gz, kg, BITS, K - 1), "packed|sum"),
        ("tattn-heads", "decode_attention_token", attention_token(q=q[:, :3]), "multiple"),
        ("tattn-kv-len", "decode_attention_token", attention_token(kv_len=5), "kv_len"),
        ("tattn-scale", "decode_attention_token", attention_token(k_scale=gsc[:, :1]), "scale"),
        ("tattn-zero", "decode_attention_token", attention_token(k_zero=gz.int()), "zero"),
        ("tattn-groups", "decode_attention_token", attention_token(k_groups=kg - 1), "sum|negative"),
        ("tattn-p-bits", "decode_attention_token", attention_token(p_bits=17), "p_bits"),
        ("tattn-bits", "decode_attention_token", attention_token(bits=5), "bits"),
    ]
    return cases


OPS = ("pack_weight", "unpack_weight", "linear_a16", "linear_aq", "fake_quant_act", "fake_quant_act_token",
       "reorder_norm", "kv_pack", "kv_unpack", "kv_append", "decode_attention", "kv_append_token", "kv_unpack_token",
       "decode_attention_token")
