"""The benchmarks run end to end and write the contract JSON (on a tiny model; the figures
in the README come from `nnsight-sae bench ...` on the embedded one)."""

import json

import pytest

from nnsight_sae import bench


@pytest.fixture
def short_tokens(monkeypatch):
    monkeypatch.setattr(bench, "_tokens", lambda model, batch, ctx: model.tokenizer(
        ["w5 w6 w7 w8 w9"] * batch, return_tensors="pt").input_ids)


def _contract(path):
    result = json.loads(path.read_text())
    assert set(result) == {"what", "ratio", "ours", "baseline", "unit", "setup"} and result["ratio"] > 0
    return result


def test_harvest_and_splice_benchmarks(tiny_models, short_tokens, tmp_path):
    model = tiny_models("llama")
    bench.bench_harvest(model, tmp_path, layers=(0, 2), rounds=2)
    bench.bench_splice(model, tmp_path, layer=1, rounds=2)
    assert _contract(tmp_path / "harvest-resid_post.0.json")["what"] == "harvest resid_post.0"
    _contract(tmp_path / "harvest-resid_post.2.json")
    _contract(tmp_path / "splice.json")


def test_train_benchmark_reaches_revival_and_checkpoints(tiny_models, corpus, tmp_path):
    """Short, on a tiny model's activations: the contract, and every code path reached (features
    die, so the auxiliary loss runs in ours and in sparsify's step; checkpoints are written)."""
    bench.bench_train(tiny_models("llama"), tmp_path, site="resid_post.1", d_sae=256, k=4, batch=32, steps=120,
                      tokens=4000, eval_tokens=256, data=corpus, chunk=20, checkpoint_every=50)
    result = _contract(tmp_path / "train.json")
    assert result["unit"].startswith("steps/s") and result["setup"]["plain_loop_steps_per_s"] > 0
    setup = result["setup"]
    assert setup["aux_active_steps"]["ours"] > 0 and setup["aux_active_steps"]["sparsify"] > 0, setup
    assert all(0 < v < 1 for v in setup["held_out_fvu"].values()), setup
