"""OPT (pre-LN): LayerNorm with bias, learned positions, ReLU MLP (DESIGN §2's table)."""
from ..errors import RptqError
from .base import Family, register


class OPTFamily(Family):
    def check(self, config) -> None:
        if not config.do_layer_norm_before:
            raise RptqError("post-LN OPT (do_layer_norm_before=False, e.g. opt-350m) is not supported: "
                            "RPTQ folds the reorder into the pre-attention LayerNorm")


OPT = register(OPTFamily(
    model_types=("opt",),
    architectures=("OPTForCausalLM",),
    layers="model.decoder.layers",
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
    attn_norm="self_attn_layer_norm",
    mlp_norm="final_layer_norm",
    attn="self_attn",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj",
    mlp_in=("fc1",),
    mlp_out="fc2",
    norm_kind="layer",
    rope=False,
    ffn_size="ffn_dim",
))
