"""Sparse feature circuits on the embedded SmolLM2 through the prose SAEs on resid_post.6, .12
and .18 (slow: minutes on 2 cores). The figures are in the README."""

import json

import pytest
import torch

from nnsight_sae import load_dictionary
from nnsight_sae.heads import encode_pair, last_logits_of
from nnsight_sae.tasks import get_task
from nnsight_sae_features.circuit import (FeatureCircuitOptions, NodeTable, ablatable_positions, check_estimates,
                                          curves, measure, nodes_to_reach, site_nodes, spliced_logits)
from nnsight_sae_features.common import counterfactual_prompts

pytestmark = pytest.mark.slow


def test_three_spliced_saes_with_errors_reproduce_the_clean_logits(smol, smol_prose_saes):
    groups = site_nodes(smol, [load_dictionary(f) for f in smol_prose_saes.values()])
    prompts = get_task("ioi").prompts(smol.tokenizer, 8)
    enc = dict(encode_pair(smol, prompts, prompts.counterfactual)[0])
    keep = [torch.ones(8, enc["input_ids"].shape[1], g.d_sae + 1, dtype=torch.bool) for g in groups]
    means = [(torch.zeros(g.d_sae), torch.zeros(576)) for g in groups]
    spliced = spliced_logits(smol, enc, groups, keep, means, ablatable_positions(enc["attention_mask"]))
    torch.testing.assert_close(spliced, last_logits_of(smol, enc), rtol=1e-4, atol=1e-4)


def test_ioi_feature_circuit_against_random_nodes(smol, smol_prose_saes):
    """An IOI feature circuit through the API on 12 prompts (integrated gradients with 5 points, mean
    ablation), each prompt keeping its own top nodes: every node kept gives the clean metric, the
    features reach 0.6 of the task with fewer nodes than random ones, and the estimates match
    patching each sampled node alone. Measured with these tests' 60k-token prose SAEs: features reach
    0.6 with 162 nodes, random nodes with 4,632; correlation 0.993. The paper's comparison with
    neurons needs the README's 300k-token SAEs (24 prompts, 10 points: features 162, neurons 1,228,
    random 5,803); here the neurons win (108)."""
    groups = site_nodes(smol, [load_dictionary(f) for f in smol_prose_saes.values()])
    task, prompts = counterfactual_prompts(smol, FeatureCircuitOptions(task="ioi", n_prompts=12))
    measured = measure(smol, task, prompts, groups, steps=5)
    table = NodeTable([measured.effects(i) for i in range(3)], by_token=False)
    neurons = NodeTable([measured.neuron_effects(i) for i in range(3)], by_token=False)
    c = curves(smol, task, prompts, measured, table, neurons, per_prompt=True)
    assert c["features"]["faithfulness"][-1] == pytest.approx(1, abs=1e-3)
    reach = {k: nodes_to_reach(c[k].get("n", c["n"]), c[k]["faithfulness"]) for k in ("features", "neurons", "random")}
    print(json.dumps(reach))
    assert reach["features"] is not None
    assert reach["random"] is None or reach["features"] < reach["random"] / 4
    checked = check_estimates(smol, task, prompts, measured, table, n_nodes=16)
    assert checked["correlation"] >= 0.9  # estimates against patching each sampled node alone
