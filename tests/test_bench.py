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


def test_train_benchmark(tmp_path):
    bench.bench_train(tmp_path, d_in=16, d_sae=64, k=4, batch=32, steps=5, rounds=1)
    assert _contract(tmp_path / "train.json")["unit"].startswith("steps/s")
