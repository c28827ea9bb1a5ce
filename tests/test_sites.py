import pytest
import torch

from nnsight_sae import SiteError, UnknownFamilyError, load_model, resolve_site
from nnsight_sae.sites import SITE_KINDS, architecture_of
from nnsight_sae.testing import make_tiny_model, tiny_prompts

PROMPTS = tiny_prompts(n=2, length=7)


def clean_logits(model):
    with model.trace(PROMPTS):
        logits = model.output.logits.save()
    return logits


def test_unmodified_trace_equals_plain_forward(tiny):
    enc = tiny.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = tiny._module(**enc).logits
    assert torch.equal(clean_logits(tiny), plain)


@pytest.mark.parametrize("kind", SITE_KINDS)
def test_every_site_reads_and_a_written_site_changes_the_logits(tiny, kind):
    clean = clean_logits(tiny)
    if kind == "resid_mid" and architecture_of(tiny).resid_mid is None:  # parallel (NeoX) or post-norm (BERT)
        with pytest.raises(SiteError, match="family has no resid_mid"):
            resolve_site(tiny, "resid_mid.1")
        return
    site = resolve_site(tiny, f"{kind}.1")
    with tiny.trace(PROMPTS):
        x = site.read().save()
        site.write(x + torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
        edited = tiny.output.logits.save()
    config = tiny._module.config
    d_model, n_heads = config.hidden_size, config.num_attention_heads
    if kind == "head_out":
        assert x.shape == (2, 7, n_heads, d_model)
    elif kind == "attn_z":  # the heads' outputs before the output projection, concatenated
        assert x.shape == (2, 7, site.d_in) and site.d_in == n_heads * (getattr(config, "head_dim", None) or
                                                                         d_model // n_heads)
    elif kind == "mlp_post":  # the MLP's hidden width
        assert x.shape == (2, 7, site.d_in) and site.d_in > d_model
    else:
        assert x.shape == (2, 7, d_model)
    assert (edited - clean).abs().max() > 1e-3


@pytest.mark.parametrize("kind", SITE_KINDS)
def test_writing_back_what_was_read_changes_nothing(tiny, kind):
    clean = clean_logits(tiny)
    if kind == "resid_mid" and architecture_of(tiny).resid_mid is None:
        return
    site = resolve_site(tiny, f"{kind}.2")
    with tiny.trace(PROMPTS):
        site.write(site.read())
        again = tiny.output.logits.save()
    torch.testing.assert_close(again, clean, rtol=1e-5, atol=1e-5)


def test_head_out_sums_to_attn_out(tiny):
    heads_site, attn_site = resolve_site(tiny, "head_out.1"), resolve_site(tiny, "attn_out.1")
    with tiny.trace(PROMPTS):
        z = heads_site.envoy.input.save()
        heads = heads_site.read().save()
        attn = attn_site.read().save()
    assert z.shape[-1] == heads_site.heads_width  # what a zero ablation replaces the heads' input with
    bias = heads_site.envoy._module.bias
    total = heads.sum(dim=2) + (0 if bias is None else bias)
    torch.testing.assert_close(total, attn, rtol=1e-5, atol=1e-6)


def test_raw_module_sites(tiny_models):
    model = tiny_models("llama")
    with model.trace(PROMPTS):
        raw_in = resolve_site(model, "module:model.layers.1.mlp.down_proj:input").read().save()
        raw = resolve_site(model, "module:model.layers.1.mlp").read().save()
    with model.trace(PROMPTS):
        named = resolve_site(model, "mlp_out.1").read().save()
    assert torch.equal(raw, named)
    assert raw_in.shape[-1] == 64
    assert resolve_site(model, "module:model.layers.1.mlp.down_proj:input").d_in == 64


@pytest.mark.parametrize("bad, match", [
    ("resid_post", "malformed site"),
    ("resid_middle.1", "malformed site"),
    ("resid_post.x", "malformed site"),
    ("resid_post.3", r"layer 3 out of range; this model has layers 0\.\.2"),
    ("resid_post.-1", "out of range"),
    ("module:model.nope", "no module 'model.nope'"),
    ("module:model.layers.1:middle", "raw site"),
])
def test_bad_sites_are_typed_errors(tiny_models, bad, match):
    with pytest.raises(SiteError, match=match):
        resolve_site(tiny_models("llama"), bad)


def test_unknown_family_names_the_families_and_the_way_out(tmp_path):
    import transformers

    cfg = transformers.OPTConfig(num_hidden_layers=2, hidden_size=16, ffn_dim=32, num_attention_heads=2,
                                 vocab_size=128, max_position_embeddings=64, word_embed_proj_dim=16)
    transformers.OPTForCausalLM(cfg).save_pretrained(tmp_path)
    make_tiny_model("llama", tmp_path / "tok")  # borrow the word-level tokenizer
    from transformers import PreTrainedTokenizerFast

    model = load_model(tmp_path, tokenizer=PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok"))
    with pytest.raises(UnknownFamilyError, match=r"'opt'.*llama.*module:PATH.*plugin"):
        resolve_site(model, "resid_post.0")
    # the raw form still works on it
    with model.trace(PROMPTS):
        out = resolve_site(model, "module:model.decoder.layers.0").read().save()
    assert out.shape == (2, 7, 16)
