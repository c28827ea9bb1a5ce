"""Published dictionaries from the Hugging Face Hub, through huggingface_hub's own code, against
a local cache laid out as huggingface_hub lays it out (HF_HUB_OFFLINE=1: nothing downloads)."""

import json
import subprocess
import sys

import pytest
import torch

from nnsight_sae import DictionaryError, load_dictionary, save_dictionary
from nnsight_sae.files import hub_patterns
from nnsight_sae.testing import random_dictionary

REPO, REVISION = "someone/tiny-saes", "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hub cache holding REPO at REVISION with two dictionaries, layer_1 and layer_2."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    for layer in (1, 2):
        save_dictionary(random_dictionary(f"resid_post.{layer}", seed=layer), repo / "snapshots" / REVISION / f"layer_{layer}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_load_dictionary_from_a_hub_repo(hub_cache):
    d = load_dictionary(REPO, "layer_2")
    assert d.site == "resid_post.2"
    torch.testing.assert_close(d.W_enc, random_dictionary("resid_post.2", seed=2).W_enc)
    with pytest.raises(DictionaryError, match="has no layer_9"):
        load_dictionary(REPO, "layer_9")


def test_only_the_files_a_format_reads_are_asked_for():
    patterns = hub_patterns("layer_2")
    assert "layer_2/cfg.json" in patterns and "layer_2/sae_weights.safetensors" in patterns
    assert all(p.startswith("layer_2/") for p in patterns)  # never another layer's files
    single = hub_patterns("transcoders/layer_3.safetensors")
    assert single[0] == "transcoders/layer_3.safetensors"
    assert "transcoders/config.yaml" in single and not any("layer_*" in p for p in single)


def test_pull_writes_our_layout(hub_cache, tmp_path):
    cmd = [sys.executable, "-m", "nnsight_sae", "pull", REPO, "layer_1", "--out", str(tmp_path / "pulled")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "a saelens topk dictionary at resid_post.1" in done.stdout
    assert json.loads((tmp_path / "pulled" / "cfg.json").read_text())["metadata"]["nnsight_sae"]["site"] == "resid_post.1"
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
    missing = subprocess.run(cmd[:4] + ["layer_7", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
