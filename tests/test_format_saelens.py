"""SAELens files, both ways, checked against SAELens 6.54.12's own code: every architecture it
saves for inference is built and saved with SAELens and read here with the same numbers; ours
are read by SAELens with the same numbers, and spliced by its HookedSAETransformer."""

import json
import warnings

import pytest
import torch

from nnsight_sae import DictionaryError, create_dictionary, load_dictionary, save_dictionary

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import SAE  # noqa: E402
from sae_lens import saes as S  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

D_IN, D_SAE, D_OUT = 32, 128, 24
X = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(0)) * 3


def _meta(transcoder=False):
    if transcoder:
        return SAEMetadata(model_name="tiny", hook_name="blocks.1.mlp.hook_in", hook_name_out="blocks.1.hook_mlp_out")
    return SAEMetadata(model_name="tiny", hook_name="blocks.1.hook_resid_post")


def _randomise(sae):
    """Non-trivial weights: non-zero biases, positive thresholds (about half the features fire),
    decoder rows of unequal norms."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.1)
            elif name == "W_dec":
                p.copy_(torch.randn(p.shape, generator=g) * (torch.rand(p.shape[0], 1, generator=g) + 0.5) / 8)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if name == "W_skip" else 0.3))
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold = torch.tensor(0.7, dtype=torch.double)
    return sae


TC = dict(d_out=D_OUT, apply_b_dec_to_input=False)
# (name, SAELens class and config, how it is saved, our type, site, out_site)
THEIRS = {
    "standard": (lambda: S.StandardSAE(S.StandardSAEConfig(D_IN, D_SAE, metadata=_meta())), "save_model", "relu"),
    "standard-no-b_dec": (lambda: S.StandardSAE(S.StandardSAEConfig(D_IN, D_SAE, apply_b_dec_to_input=False,
                                                                     metadata=_meta())), "save_model", "relu"),
    "topk": (lambda: S.TopKSAE(S.TopKSAEConfig(D_IN, D_SAE, k=8, metadata=_meta())), "save_model", "topk"),
    "topk-rescaled": (lambda: S.TopKSAE(S.TopKSAEConfig(D_IN, D_SAE, k=8, rescale_acts_by_decoder_norm=True,
                                                        metadata=_meta())), "save_model", "topk"),
    "topk-training": (lambda: S.TopKTrainingSAE(S.TopKTrainingSAEConfig(D_IN, D_SAE, k=8, metadata=_meta())),
                      "save_inference_model", "topk"),
    "batchtopk": (lambda: S.BatchTopKTrainingSAE(S.BatchTopKTrainingSAEConfig(D_IN, D_SAE, k=8, metadata=_meta())),
                  "save_inference_model", "jumprelu"),
    "matryoshka": (lambda: S.MatryoshkaBatchTopKTrainingSAE(S.MatryoshkaBatchTopKTrainingSAEConfig(
        D_IN, D_SAE, k=8, matryoshka_widths=[32, 64, D_SAE], metadata=_meta())), "save_inference_model", "jumprelu"),
    "jumprelu": (lambda: S.JumpReLUSAE(S.JumpReLUSAEConfig(D_IN, D_SAE, metadata=_meta())), "save_model", "jumprelu"),
    "gated": (lambda: S.GatedSAE(S.GatedSAEConfig(D_IN, D_SAE, metadata=_meta())), "save_model", "gated"),
    "gated-no-b_dec": (lambda: S.GatedSAE(S.GatedSAEConfig(D_IN, D_SAE, apply_b_dec_to_input=False, metadata=_meta())),
                       "save_model", "gated"),
    "transcoder": (lambda: S.Transcoder(S.TranscoderConfig(D_IN, D_SAE, metadata=_meta(True), **TC)),
                   "save_model", "transcoder"),
    "skip-transcoder": (lambda: S.SkipTranscoder(S.SkipTranscoderConfig(D_IN, D_SAE, metadata=_meta(True), **TC)),
                        "save_model", "transcoder"),
    "jumprelu-transcoder": (lambda: S.JumpReLUTranscoder(S.JumpReLUTranscoderConfig(
        D_IN, D_SAE, metadata=_meta(True), **TC)), "save_model", "jumprelu"),
    "jumprelu-skip-transcoder": (lambda: S.JumpReLUSkipTranscoder(S.JumpReLUSkipTranscoderConfig(
        D_IN, D_SAE, metadata=_meta(True), **TC)), "save_model", "jumprelu"),
}


def _same_numbers(ours, theirs, x=X):
    """Features, decode and the full forward agree within 1e-5."""
    with torch.no_grad():
        f_theirs = theirs.encode(x)
        torch.testing.assert_close(ours.encode(x), f_theirs, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.decode(f_theirs), theirs.decode(f_theirs), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)
        assert 0 < (f_theirs != 0).float().mean() < 0.9  # a realistic share of features fires


@pytest.mark.parametrize("case", list(THEIRS))
def test_saelens_files_read_with_saelens_numbers(tmp_path, case):
    make, save, our_type = THEIRS[case]
    theirs = _randomise(make()).eval()
    getattr(theirs, save)(tmp_path / case)
    ours = load_dictionary(tmp_path / case)
    assert ours.type_name == our_type
    transcoder = "transcoder" in case
    assert (ours.site, ours.out_site) == (("mlp_in.1", "mlp_out.1") if transcoder else ("resid_post.1", None))
    _same_numbers(ours, SAE.load_from_disk(tmp_path / case).eval())  # as SAELens reads the file


def test_a_pre6_flat_topk_config_is_topk(tmp_path):
    """SAELens < 6 wrote flat configs naming every SAE "standard", a top-k one by its activation."""
    theirs = _randomise(S.TopKSAE(S.TopKSAEConfig(D_IN, D_SAE, k=16, metadata=_meta())))
    theirs.save_model(tmp_path / "old")
    flat = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
            "model_name": "gpt2", "hook_point": "blocks.1.hook_resid_post", "hook_point_layer": 1,
            "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 16}, "apply_b_dec_to_input": True,
            "normalize_activations": False}
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(flat))
    reread = SAE.load_from_disk(tmp_path / "old")
    assert type(reread).__name__ == "TopKSAE"  # SAELens itself reads it as top-k
    ours = load_dictionary(tmp_path / "old")
    assert ours.type_name == "topk" and ours.cfg.k == 16
    _same_numbers(ours, reread)


OURS = {"relu": {}, "relu-tied": {"tied": True}, "topk": {"k": 8}, "batchtopk": {"k": 8}, "jumprelu": {},
        "gated": {}, "gated-no-b_dec": {"apply_b_dec_to_input": False}, "discrete": {},
        "transcoder": {}, "transcoder-skip": {"skip": True},
        "jumprelu-transcoder": {"out_site": "mlp_out.1", "apply_b_dec_to_input": False, "skip": True}}


def _ours(case):
    type_name = case.split("-")[0]
    site = "mlp_in.1" if "transcoder" in case else "resid_post.1"
    d = create_dictionary(type_name, d_in=D_IN, d_sae=D_SAE, site=site, **OURS[case])
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in d.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 0.4 + 0.1 if "threshold" in name
                    else torch.randn(p.shape, generator=g) * 0.3)
    return d


@pytest.mark.parametrize("case", list(OURS))
def test_saelens_reads_our_files_with_our_numbers(tmp_path, case):
    ours = _ours(case)
    if case == "relu-tied":
        ours.normalize_decoder()
        with torch.no_grad():
            ours.W_dec.mul_(1.1)  # edited without normalize_decoder: the file must still hold our weights
    save_dictionary(ours, tmp_path / case)
    theirs = SAE.load_from_disk(tmp_path / case).eval()
    _same_numbers(ours, theirs)
    hook = theirs.cfg.metadata.hook_name
    assert hook == ("blocks.1.mlp.hook_in" if "transcoder" in case else "blocks.1.hook_resid_post")


def test_saelens_splices_our_file_into_its_hooked_model(tmp_path):
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    torch.manual_seed(0)
    model = HookedSAETransformer(HookedTransformerConfig(n_layers=2, d_model=D_IN, n_ctx=16, d_head=8, n_heads=4,
                                                         d_mlp=64, d_vocab=50, act_fn="gelu"))
    save_dictionary(_ours("topk"), tmp_path / "d")
    sae = SAE.load_from_disk(tmp_path / "d")
    tokens = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        clean = model(tokens)
        spliced = model.run_with_saes(tokens, saes=[sae])
        with_error = model.run_with_saes(tokens, saes=[sae], use_error_term=True)
    assert not torch.allclose(clean, spliced)  # it was spliced at blocks.1.hook_resid_post
    torch.testing.assert_close(with_error, clean, rtol=1e-4, atol=1e-4)


def test_a_site_without_a_transformerlens_hook_is_said_at_save_time(tmp_path):
    d = create_dictionary("relu", d_in=D_IN, d_sae=D_SAE, site="head_out.1")
    with pytest.warns(UserWarning, match="head_out.1 has no TransformerLens hook"):
        save_dictionary(d, tmp_path / "d")
    assert load_dictionary(tmp_path / "d").site == "head_out.1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_dictionary(_ours("relu"), tmp_path / "quiet")


@pytest.mark.parametrize("hook, site", [("blocks.3.hook_resid_mid", "resid_mid.3"),
                                        ("blocks.3.hook_mlp_in", "resid_mid.3"),  # TL: the residual before ln2
                                        ("blocks.3.attn.hook_z", "attn_z.3"), ("blocks.3.mlp.hook_post", "mlp_post.3"),
                                        ("blocks.3.mlp.hook_in", "mlp_in.3")])
def test_transformerlens_hooks_map_to_sites(tmp_path, hook, site):
    theirs = _randomise(S.StandardSAE(S.StandardSAEConfig(D_IN, D_SAE, metadata=SAEMetadata(hook_name=hook))))
    theirs.save_model(tmp_path / "d")
    assert load_dictionary(tmp_path / "d").site == site


def test_bad_saelens_files(tmp_path):
    theirs = _randomise(S.TopKSAE(S.TopKSAEConfig(D_IN, D_SAE, k=8, metadata=SAEMetadata(hook_name="hook_embed"))))
    theirs.save_model(tmp_path / "embed")
    with pytest.raises(DictionaryError, match="hook 'hook_embed' has no nnsight-sae site"):
        load_dictionary(tmp_path / "embed")
    theirs = _randomise(S.Transcoder(S.TranscoderConfig(D_IN, D_SAE, metadata=SAEMetadata(
        hook_name="blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out"), **TC)))
    theirs.save_model(tmp_path / "normed")
    with pytest.raises(DictionaryError, match="ln2.hook_normalized' has no nnsight-sae site: it is the residual "
                                              "normed before ln2's weight"):
        load_dictionary(tmp_path / "normed")
    theirs = _randomise(S.TopKSAE(S.TopKSAEConfig(D_IN, D_SAE, k=8, metadata=_meta())))
    theirs.save_model(tmp_path / "k")
    cfg = json.loads((tmp_path / "k" / "cfg.json").read_text())
    (tmp_path / "k" / "cfg.json").write_text(json.dumps({**cfg, "k": D_SAE + 1}))
    with pytest.raises(DictionaryError, match=f"k={D_SAE + 1} is more than the dictionary's {D_SAE} features"):
        load_dictionary(tmp_path / "k")
    (tmp_path / "k" / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(DictionaryError, match="normalize_activations='layer_norm' rescales every token"):
        load_dictionary(tmp_path / "k")
