import json

import pytest
import torch

from nnsight_sae.corpus import (CorpusError, contexts, embedded_corpus, load_corpus, prose_documents,
                                stdlib_documents)
from nnsight_sae.harvest import ActivationStore, HarvestError, forward_order, harvest
from nnsight_sae.sites import resolve_site
from nnsight_sae.testing import VOCAB, tiny_prompts


def test_stdlib_corpus_is_deterministic_and_held_out_is_disjoint():
    a, b = stdlib_documents(), stdlib_documents()
    assert a == b and len(a) > 500
    train, test = embedded_corpus("code", "train"), embedded_corpus("code", "test")
    assert len(test) > 10 and not set(train["source"]) & set(test["source"])
    assert any("def " in t for t in train["text"][:50])  # source code
    assert any(s.startswith("pydoc_data.topics:") for s in list(train["source"]) + list(test["source"]))


def test_prose_corpus_has_people_and_dialogue_and_a_disjoint_held_out_part():
    docs = prose_documents()
    assert len(docs) > 1500 and docs == prose_documents()
    texts = [t for _, t in docs]
    assert sum('"' in t for t in texts) > len(texts) / 2  # dialogue
    assert sum(name in t for t in texts for name in ("Mary", "John")) > 50
    assert not any("def " in t and "self" in t for t in texts)
    train, test = embedded_corpus("prose", "train"), embedded_corpus("prose", "test")
    assert len(train) + len(test) == len(docs) and len(test) > 40
    assert not set(train["text"]) & set(test["text"])


def test_mix_interleaves_prose_and_code_by_characters_while_the_prose_lasts():
    mix = embedded_corpus("mix", "train")
    prose = set(embedded_corpus("prose", "train")["text"])
    head = mix["text"][:400]
    prose_chars = sum(len(t) for t in head if t in prose)
    code_chars = sum(len(t) for t in head if t not in prose)
    assert 0.3 < prose_chars / (prose_chars + code_chars) < 0.7
    assert len(mix) == len(prose) + len(embedded_corpus("code", "train"))
    assert load_corpus(corpus="mix")["text"][:5] == mix["text"][:5]


def test_one_source_at_a_time():
    with pytest.raises(CorpusError, match="give one of --corpus, --dataset and --data"):
        load_corpus(corpus="prose", data="x.txt")
    with pytest.raises(CorpusError, match="no embedded corpus 'poetry'"):
        load_corpus(corpus="poetry")


def test_contexts_have_fixed_length_and_stop_at_the_budget(tiny_models):
    tok = tiny_models("gpt2").tokenizer
    ctx = contexts(embedded_corpus("code"), tok, 16, n_tokens=1000)
    assert ctx.shape == (63, 16) and ctx.max() < VOCAB


def test_contexts_start_with_bos_when_the_model_expects_one():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {"<s>": 0, "</s>": 1, "[UNK]": 2} | {f"w{i}": i + 3 for i in range(20)}
    tk = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    corpus = [{"text": " ".join(f"w{i % 20}" for i in range(50))}]
    ctx = contexts(corpus, tok, 8)
    assert (ctx[:, 0] == 0).all() and (ctx[:, 1:] != 0).all()
    assert ctx[0, 1:].tolist() == [3, 4, 5, 6, 7, 8, 9]


def test_local_data_files(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": f"document {i} " * 20}) for i in range(60)))
    ds = load_corpus(data=str(tmp_path / "a.jsonl"), text_column="body")
    held = load_corpus(data=str(tmp_path / "a.jsonl"), text_column="body", held_out=True)
    assert len(ds) + len(held) == 60 and "text" in ds.column_names
    (tmp_path / "b.txt").write_text("first doc\nline two\n\nsecond doc\n\n\n")
    docs = list(load_corpus(data=str(tmp_path / "b.txt"))["text"]) + list(
        load_corpus(data=str(tmp_path / "b.txt"), held_out=True)["text"])
    assert sorted(docs) == ["first doc\nline two", "second doc"]
    import datasets

    datasets.Dataset.from_dict({"text": ["x y z"] * 5}).to_parquet(str(tmp_path / "c.parquet"))
    assert len(load_corpus(data=str(tmp_path / "c.parquet"))) + len(
        load_corpus(data=str(tmp_path / "c.parquet"), held_out=True)) == 5


def test_bad_data_is_a_clear_error(tmp_path, tiny_models):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(CorpusError, match="text column 'text' not found; columns: body"):
        load_corpus(data=str(tmp_path / "a.jsonl"))
    with pytest.raises(CorpusError, match="no such data file"):
        load_corpus(data=str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("")
    tok = tiny_models("gpt2").tokenizer
    with pytest.raises(CorpusError, match="corpus is empty"):
        contexts(load_corpus(data=str(tmp_path / "empty.txt")), tok, 8)
    with pytest.raises(CorpusError, match="longer than the model allows"):
        contexts(embedded_corpus("code"), tok, 256, max_positions=128)


def test_forward_order():
    assert forward_order(["resid_post.2", "mlp_in.2", "head_out.0", "resid_pre.2", "module:x"]) == \
        ["head_out.0", "resid_pre.2", "mlp_in.2", "resid_post.2", "module:x"]


def _ids(model, n=4, length=9):
    return model.tokenizer(tiny_prompts(n=n, length=length), return_tensors="pt").input_ids


def test_harvest_matches_direct_reads_and_drops_padding(tiny_models):
    model = tiny_models("llama")
    ids = _ids(model)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # three padded positions in the first row
    got = list(harvest(model, ["mlp_out.1", "resid_pre.0"], ids, attention_mask=mask, batch_size=2,
                       progress=False))
    rows = torch.cat([g["mlp_out.1"] for g in got])
    assert rows.shape == (4 * 9 - 3, 32)
    site = resolve_site(model, "mlp_out.1")
    with model.trace({"input_ids": ids[:2], "attention_mask": mask[:2]}):
        direct = site.read().save()
    torch.testing.assert_close(got[0]["mlp_out.1"], direct[mask[:2].bool().to(direct.device)].cpu(), rtol=0, atol=0)
    with_bos_dropped = list(harvest(model, ["mlp_out.1"], ids, batch_size=4, drop_bos=True, progress=False))
    assert with_bos_dropped[0]["mlp_out.1"].shape == (4 * 8, 32)


def test_store_is_aligned_shuffled_deterministic_and_resumable(tiny_models, tmp_path):
    model = tiny_models("gpt2")
    ids = _ids(model, n=12, length=10)
    store = ActivationStore.build(tmp_path / "s", model, ["mlp_in.1", "mlp_out.1"], ids, batch_size=5,
                                  progress=False)
    assert store.n_rows == 120 and store.shapes == {"mlp_in.1": [32], "mlp_out.1": [32]}
    # rows stay aligned across sites: mlp_out = mlp(mlp_in) row by row
    mlp = model._module.transformer.h[1].mlp
    b = next(store.batches(16, buffer_rows=40, seed=3))
    device = next(mlp.parameters()).device  # the store is on the CPU, the model wherever it was loaded
    torch.testing.assert_close(mlp(b["mlp_in.1"].to(device)).cpu(), b["mlp_out.1"], rtol=1e-5, atol=1e-5)
    one = [x["mlp_in.1"] for x in store.batches(16, buffer_rows=40, seed=3, epoch=1)]
    two = [x["mlp_in.1"] for x in store.batches(16, buffer_rows=40, seed=3, epoch=1)]
    other = [x["mlp_in.1"] for x in store.batches(16, buffer_rows=40, seed=3, epoch=2)]
    assert all(torch.equal(a, b) for a, b in zip(one, two)) and not torch.equal(one[0], other[0])
    assert len(one) == store.batches_per_epoch(16, buffer_rows=40, seed=3, epoch=1)
    tail = [x["mlp_in.1"] for x in store.batches(16, buffer_rows=40, seed=3, epoch=1, start=3)]
    assert all(torch.equal(a, b) for a, b in zip(one[3:], tail)) and len(tail) == len(one) - 3
    # an epoch sees every row at most once
    seen = torch.cat(one)
    assert len(torch.unique(seen, dim=0)) == len(seen)


def test_a_cached_harvest_serves_any_of_its_sites_on_the_same_tokens(tiny_models, tmp_path):
    model = tiny_models("gpt2")
    ids = _ids(model)

    def cached(sites, tokens=ids, **info):
        return ActivationStore.cached(model, sites, tokens, cache_root=tmp_path, key_info={"model": "m", **info},
                                      progress=False)

    both = cached(["mlp_in.1", "mlp_out.1"])
    assert cached(["mlp_out.1"]).folder == both.folder == cached(["mlp_out.1", "mlp_in.1"]).folder
    # other tokens, other key (corpus, BOS handling, ...) or a site it lacks: a harvest of its own
    assert cached(["mlp_out.1"], tokens=_ids(model, n=5)).folder != both.folder
    assert cached(["mlp_out.1"], corpus="prose").folder != both.folder
    wider = cached(["mlp_out.1", "resid_post.0"])
    assert wider.folder != both.folder and len(list(tmp_path.glob("*/meta.json"))) == 4
    torch.testing.assert_close(next(wider.batches(8, seed=1, sites=["mlp_out.1"]))["mlp_out.1"],
                               next(both.batches(8, seed=1, sites=["mlp_out.1"]))["mlp_out.1"], rtol=0, atol=0)


def test_oversized_buffer_is_refused(tiny_models, tmp_path):
    model = tiny_models("gpt2")
    store = ActivationStore.build(tmp_path / "s", model, ["resid_post.0"], _ids(model), progress=False)
    with pytest.raises(HarvestError, match="GiB, over half this machine's memory"):
        next(store.batches(4, buffer_rows=10**12))
