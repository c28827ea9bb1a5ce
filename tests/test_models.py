import os
import time

import pytest
import torch

from nnsight_sae import ModelLoadError, load_model, resolve_site
from nnsight_sae.models import _MARKER, cache_dir, embedded_gguf_path, gguf_to_folder

IOI = "When Mary and John went to the store, John gave a drink to"


@pytest.mark.slow
def test_embedded_model_loads_fast_and_does_ioi(smol):
    t = time.perf_counter()
    model = load_model()  # the cache exists now (the smol fixture built it)
    assert time.perf_counter() - t < 2.0
    tok = model.tokenizer
    mary, john = tok(" Mary").input_ids, tok(" John").input_ids
    assert len(mary) == len(john) == 1
    with model.trace(IOI):
        logits = model.output.logits[0, -1].save()
    assert logits[mary[0]] > logits[john[0]] + 1.0
    cfg = model._module.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert resolve_site(model, "head_out.29").n_heads == 9


@pytest.mark.slow
def test_corrupt_and_half_written_caches_are_rebuilt(tmp_path, monkeypatch, smol):
    monkeypatch.setenv("NNSIGHT_SAE_CACHE", str(tmp_path))
    gguf = embedded_gguf_path()
    # what a killed conversion leaves: a temp folder, never used
    folder = gguf_to_folder(gguf)
    leftover = folder.parent / f".{folder.name}.killed"
    leftover.mkdir()
    assert gguf_to_folder(gguf) == folder
    # a truncated weights file fails the size check and is rebuilt
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    assert gguf_to_folder(gguf) == folder and weights.stat().st_size == size
    # same size, garbage content: the load fails and the cache is rebuilt once
    with open(weights, "r+b") as f:
        f.write(b"\0" * 64)
    model = load_model()
    with model.trace(IOI):
        logits = model.output.logits.save()
    with smol.trace(IOI):
        ref = smol.output.logits.save()
    assert torch.equal(logits, ref)
    # a missing marker means incomplete
    os.remove(folder / _MARKER)
    assert gguf_to_folder(gguf) == folder and (folder / _MARKER).exists()


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NNSIGHT_SAE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


@pytest.mark.parametrize("name, match", [
    ("/nonexistent/model.gguf", "no such GGUF file"),
    ("./no/such/folder", "not a model folder"),
])
def test_bad_model_names_are_typed(name, match):
    with pytest.raises(ModelLoadError, match=match):
        load_model(name)


def test_corrupt_gguf_is_a_typed_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NNSIGHT_SAE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="cannot read GGUF file"):
        load_model(bad)
    assert not any((tmp_path / "cache" / "models").glob("broken*"))  # nothing half-written


def test_local_folder_with_dtype_and_device_map(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from nnsight_sae.testing import make_tiny_model, tiny_prompts

    folder = make_tiny_model("gpt2", tmp_path)
    model = load_model(folder, tokenizer=PreTrainedTokenizerFast.from_pretrained(folder),
                       dtype=torch.bfloat16, device_map={"": "cpu"}, max_memory={"cpu": "1GiB"})
    assert next(model._module.parameters()).dtype == torch.bfloat16
    with model.trace(tiny_prompts()):
        x = resolve_site(model, "resid_post.0").read().save()
    assert x.dtype == torch.bfloat16


def test_device_map_naming_missing_devices_is_refused(tmp_path):
    from nnsight_sae.models import check_device_map

    n = torch.cuda.device_count()
    for ok in (None, "auto", "cpu", {"": "cpu"}, {"model.layers.0": "cpu", "lm_head": "disk"}):
        check_device_map(ok)
    with pytest.raises(ModelLoadError, match=f"names cuda:{n}, but this machine has {n} CUDA device"):
        load_model(tmp_path / "never-read", device_map={"model.layers.0": "cpu", "model.layers.1": f"cuda:{n}"})
    with pytest.raises(ModelLoadError, match=f"names cuda:{n}"):
        check_device_map(n)  # accelerate's integer form
    with pytest.raises(ModelLoadError, match="'gpu7', which is not a device"):
        check_device_map({"": "gpu7"})
