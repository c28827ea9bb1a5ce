"""Cross-device placement for real: a tiny Llama split between cuda:0 and the CPU by a
device_map, against the same model on the CPU. Skipped without CUDA."""

import pytest
import torch

from nnsight_sae import attach, run_analysis, save_dictionary
from nnsight_sae.attach import site_device
from nnsight_sae.circuits import run_circuit
from nnsight_sae.evaluate import evaluate, replacement_ce
from nnsight_sae.harvest import harvest
from nnsight_sae.pipeline import DataSpec, RunSpec, build_dictionaries, train_and_evaluate
from nnsight_sae.sites import resolve_site
from nnsight_sae.testing import load_tiny_model, random_dictionary, tiny_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# embeddings and layer 0 on the GPU; layers 1-2, the final norm and the head offloaded to the CPU
# (accelerate keeps their weights in CPU memory and runs them on the GPU)
SPLIT = {"model.embed_tokens": "cuda:0", "model.rotary_emb": "cuda:0", "model.layers.0": "cuda:0",
         "model.layers.1": "cpu", "model.layers.2": "cpu", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(the tiny Llama on the CPU, the same weights split across cuda:0 and the CPU)."""
    folder = tmp_path_factory.mktemp("llama")
    return (load_tiny_model("llama", folder, device_map={"": "cpu"}),
            load_tiny_model("llama", folder, device_map=SPLIT))


def _logits(model, prompts):
    with torch.no_grad(), model.trace(prompts):
        logits = model.output.logits.save()
    return logits.cpu()


def test_layers_are_split_and_the_model_matches_the_cpu_one(models):
    cpu, split = models
    layers = split._module.model.layers
    assert layers[0].self_attn.q_proj.weight.device.type == "cuda"
    assert layers[2].self_attn.q_proj.weight.device.type == "meta"  # offloaded
    for layer in range(3):  # where the activations are
        assert site_device(split, resolve_site(split, f"resid_post.{layer}")).type == "cuda"
    prompts = tiny_prompts(4)
    torch.testing.assert_close(_logits(split, prompts), _logits(cpu, prompts), rtol=1e-4, atol=1e-4)


def test_auto_placement_with_max_memory_spills_layers_to_the_cpu(models, tmp_path):
    cpu = models[0]
    size = sum(p.numel() * p.element_size() for p in cpu._module.parameters())
    auto = load_tiny_model("llama", tmp_path, device_map="auto", max_memory={0: size // 2, "cpu": 10**9})
    assert set(auto._module.hf_device_map.values()) >= {0, "cpu"}, auto._module.hf_device_map
    assert {site_device(auto, resolve_site(auto, f"resid_post.{i}")).type for i in range(3)} == {"cuda"}
    prompts = tiny_prompts(4)
    torch.testing.assert_close(_logits(auto, prompts), _logits(cpu, prompts), rtol=1e-4, atol=1e-4)


def test_dictionaries_follow_their_sites_and_splice_exactly(models):
    split = models[1]
    early, late = attach(split, random_dictionary("resid_post.0")), attach(split, random_dictionary("resid_post.2"))
    assert early.dictionary.W_enc.device.type == late.dictionary.W_enc.device.type == "cuda"
    prompts = tiny_prompts(4)
    clean = _logits(split, prompts)
    with torch.no_grad(), split.trace(prompts):
        early.splice()
        late.splice()
        spliced = split.output.logits.save()
    torch.testing.assert_close(spliced.cpu(), clean, rtol=1e-4, atol=1e-4)  # error terms kept: exact
    with torch.no_grad(), split.trace(prompts):
        early.splice(ablate=list(range(64)))  # every feature off at layer 0 (on the GPU) changes the CPU logits
        ablated = split.output.logits.save()
    assert (ablated.cpu() - clean).abs().max() > 1e-3


def test_harvest_evaluate_and_replacement_match_the_cpu_model(models):
    cpu, split = models
    tokens = cpu.tokenizer(tiny_prompts(6, 10), return_tensors="pt").input_ids
    sites = ["resid_post.0", "resid_post.2", "head_out.2"]  # head_out reads the offloaded o_proj's weight
    rows = [list(harvest(m, sites, tokens, progress=False))[0] for m in models]
    for site in sites:
        torch.testing.assert_close(rows[1][site], rows[0][site], rtol=1e-4, atol=1e-4)
    tc = random_dictionary("mlp_in.0", type_name="transcoder", out_site="mlp_out.0")
    sae = random_dictionary("resid_post.2")
    results = [evaluate(m, [sae, tc], tokens, progress=False) for m in models]
    for a, b in zip(*results):
        for key in ("ce_clean", "ce_spliced", "fvu"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    ces = [replacement_ce(m, [tc], tokens, progress=False) for m in models]
    assert ces[1]["ce_replaced"] == pytest.approx(ces[0]["ce_replaced"], rel=1e-4)


def test_training_puts_each_dictionary_where_its_activations_are(models, tmp_path, corpus):
    split = models[1]
    run = RunSpec(types=["topk"], sites=["resid_post.0", "resid_post.2"], d_sae=[64], hyper={"k": 4},
                  batch_size=64, buffer_rows=4096)
    assert [d.W_enc.device.type for d in build_dictionaries(split, run)] == ["cuda", "cuda"]
    results = train_and_evaluate(split, DataSpec(data=corpus, tokens=3000, ctx_len=40, eval_tokens=200), run,
                                 {"lr": 1e-3, "seed": 0}, tmp_path / "out", progress=False)
    assert len(results) == 2 and all(0 < r["fvu"] < 1 for r in results)


def test_analyses_on_the_split_model_match_the_cpu_model(models, tmp_path, corpus, counterfactual_task, task_file):
    data = dict(data=corpus, tokens=2000, ctx_len=40)
    up = save_dictionary(random_dictionary("resid_post.0", seed=1), tmp_path / "up")
    out = []
    for i, model in enumerate(models):
        circuit = run_circuit(model, task_file, tmp_path / f"c{i}", method="attribution", n_prompts=12)
        patching = run_analysis("feature-patching", model=model, dictionary=random_dictionary("resid_post.1"),
                                out_dir=tmp_path / f"p{i}", task=counterfactual_task, n_prompts=8, candidates=4,
                                **data)
        tree = run_analysis("causal-tree", model=model, dictionary=random_dictionary("resid_post.1"),
                            out_dir=tmp_path / f"t{i}", feature=5, upstream=[str(up)], contexts=4, candidates=8,
                            **data)
        out.append((circuit, patching, tree))
    (c0, p0, t0), (c1, p1, t1) = out
    assert [h["effect"] for h in c1["heads"]] == pytest.approx([h["effect"] for h in c0["heads"]], rel=1e-3,
                                                               abs=1e-4)
    assert p1["sae"]["per_prompt"]["kl"] == pytest.approx(p0["sae"]["per_prompt"]["kl"], rel=1e-3, abs=1e-5)
    assert [e["feature"] for e in t1["tree"]["ranking"]] == [e["feature"] for e in t0["tree"]["ranking"]]
