"""First-party architecture maps: GPT-2, Llama family, GPT-NeoX, Gemma 2/3, BERT."""

from nnsight_sae import ArchitectureMap, hookimpl

LLAMA = ArchitectureMap(
    name="llama",
    help="Llama-family decoders (Llama, SmolLM2, Qwen2/3, Mistral)",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    layers="model.layers",
    resid_pre=":input",
    resid_post=":output",
    attn_out="self_attn:output",
    mlp_in="mlp:input",
    mlp_out="mlp:output",
    o_proj="self_attn.o_proj",
    mlp="mlp",
    resid_mid="post_attention_layernorm:input",
    mlp_post="mlp.down_proj:input",
    embed="model.embed_tokens",
    unembed="lm_head",
    final_norm="model.norm",
    mlp_norm="post_attention_layernorm",
    attn_norm="input_layernorm",
    v_proj="self_attn.v_proj",
    norm="rmsnorm",
)

# Gemma 2/3 norm the attention and MLP outputs again before the residual add;
# attn_out and mlp_out are the modules' own outputs, before those norms.
GEMMA = ArchitectureMap(
    name="gemma",
    help="Gemma 2 and Gemma 3 text decoders",
    model_types=("gemma2", "gemma3_text", "gemma3"),
    layers="model.layers",
    resid_pre=":input",
    resid_post=":output",
    attn_out="self_attn:output",
    mlp_in="mlp:input",
    mlp_out="mlp:output",
    o_proj="self_attn.o_proj",
    mlp="mlp",
    resid_mid="pre_feedforward_layernorm:input",
    mlp_post="mlp.down_proj:input",
    embed="model.embed_tokens",
    unembed="lm_head",
    final_norm="model.norm",
    mlp_norm="pre_feedforward_layernorm",
    attn_norm="input_layernorm",
    v_proj="self_attn.v_proj",
    norm="rmsnorm",
    post_norms=True,
)

GPT2 = ArchitectureMap(
    name="gpt2",
    help="GPT-2",
    model_types=("gpt2",),
    layers="transformer.h",
    resid_pre=":input",
    resid_post=":output",
    attn_out="attn:output",
    mlp_in="mlp:input",
    mlp_out="mlp:output",
    o_proj="attn.c_proj",
    o_proj_layout="conv1d",
    mlp="mlp",
    resid_mid="ln_2:input",
    mlp_post="mlp.c_proj:input",
    embed="transformer.wte",
    unembed="lm_head",
    final_norm="transformer.ln_f",
    mlp_norm="ln_2",
    attn_norm="ln_1",
)

# Pythia: attention and MLP read the same residual (parallel residual).
GPT_NEOX = ArchitectureMap(
    name="gpt_neox",
    help="GPT-NeoX (Pythia)",
    model_types=("gpt_neox",),
    layers="gpt_neox.layers",
    resid_pre=":input",
    resid_post=":output",
    attn_out="attention:output",
    mlp_in="mlp:input",
    mlp_out="mlp:output",
    o_proj="attention.dense",
    mlp="mlp",
    resid_mid=None,
    mlp_post="mlp.dense_4h_to_h:input",
    embed="gpt_neox.embed_in",
    unembed="lm_head",
    final_norm="gpt_neox.final_layer_norm",
    mlp_norm="post_attention_layernorm",
    attn_norm="input_layernorm",
    parallel_residual=True,
)

# BERT is post-norm: attn_out and mlp_out are the dense projections' outputs,
# before the residual add and LayerNorm inside BertSelfOutput / BertOutput.
# Its MLP is split over two modules, so there is no single module to replace.
BERT = ArchitectureMap(
    name="bert",
    help="BERT-style encoders",
    model_types=("bert",),
    layers="bert.encoder.layer",
    resid_pre=":input",
    resid_post=":output",
    attn_out="attention.output.dense:output",
    mlp_in="intermediate:input",
    mlp_out="output.dense:output",
    o_proj="attention.output.dense",
    mlp=None,
    resid_mid=None,
    mlp_post="output.dense:input",
    embed="bert.embeddings.word_embeddings",
    unembed="cls.predictions.decoder",
    v_proj="attention.self.value",
    post_norms=True,
)


@hookimpl
def nnsight_sae_architectures():
    return [LLAMA, GEMMA, GPT2, GPT_NEOX, BERT]
