"""dictionary_learning's layout (ae.pt + config.json), checked against dictionary-learning 0.1.0's own code:
its trainers build each class, its trainSAE saves it, its utils.load_dictionary reads it back."""

import importlib.util
import json
import os
import pickle
import shutil
import sys
import types

import pytest
import torch

pytest.importorskip("dictionary_learning")
if importlib.util.find_spec("wandb") is None:  # training.py imports wandb at the top; used only with use_wandb
    sys.modules["wandb"] = types.ModuleType("wandb")

from dictionary_learning import utils  # noqa: E402
from dictionary_learning.dictionary import (AutoEncoder, AutoEncoderNew, GatedAutoEncoder,  # noqa: E402
                                            JumpReluAutoEncoder)
from dictionary_learning.trainers import (BatchTopKTrainer, GatedSAETrainer, JumpReluTrainer,  # noqa: E402
                                          StandardTrainer, TopKTrainer)
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE  # noqa: E402
from dictionary_learning.trainers.matryoshka_batch_top_k import (MatryoshkaBatchTopKSAE,  # noqa: E402
                                                                 MatryoshkaBatchTopKTrainer)
from dictionary_learning.trainers.top_k import AutoEncoderTopK  # noqa: E402
from dictionary_learning.training import trainSAE  # noqa: E402

from nnsight_sae import DictionaryError, load_dictionary, save_dictionary  # noqa: E402
from nnsight_sae.files import formats  # noqa: E402

D, F, K = 16, 64, 6


@torch.no_grad()
def randomize(ae, seed=0):
    """Random non-trivial values in every parameter: positive thresholds, a global threshold of 0.3."""
    g = torch.Generator().manual_seed(seed)
    for name, p in ae.named_parameters():
        p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name == "r_mag" else 0.2))
        if name == "threshold":
            p.abs_().add_(0.1)
    if isinstance(ae, (BatchTopKSAE, MatryoshkaBatchTopKSAE)):
        ae.threshold.fill_(0.3)


def random_init(trainer_class):
    class Random(trainer_class):
        def __init__(self, **kw):
            super().__init__(**kw)
            randomize(self.ae)
    return Random


class Data(list):
    """No activations (so no training step), and the buffer config trainSAE saves."""
    config = {"io": "out", "d_submodule": D}


# "steps" is the trainer's own setting (it must exceed warmup_steps); trainSAE runs none (steps=0)
COMMON = dict(steps=10, activation_dim=D, dict_size=F, layer=2, lm_name="tiny/lm", submodule_name="resid_post_layer_2",
              device="cpu", warmup_steps=1)
CLASSES = {  # dict_class -> (trainer config, our type)
    "AutoEncoder": ({"trainer": StandardTrainer, "dict_class": AutoEncoder, "sparsity_warmup_steps": 1}, "relu"),
    "GatedAutoEncoder": ({"trainer": GatedSAETrainer, "dict_class": GatedAutoEncoder, "sparsity_warmup_steps": 1},
                         "gated"),
    "JumpReluAutoEncoder": ({"trainer": JumpReluTrainer, "dict_class": JumpReluAutoEncoder,
                             "sparsity_warmup_steps": 1}, "jumprelu"),
    "AutoEncoderTopK": ({"trainer": TopKTrainer, "dict_class": AutoEncoderTopK, "k": K}, "topk"),
    "BatchTopKSAE": ({"trainer": BatchTopKTrainer, "dict_class": BatchTopKSAE, "k": K}, "batchtopk"),
    "MatryoshkaBatchTopKSAE": ({"trainer": MatryoshkaBatchTopKTrainer, "dict_class": MatryoshkaBatchTopKSAE, "k": K,
                                "group_fractions": [0.25, 0.75]}, "batchtopk"),
}


def train_and_save(folder, dict_class, io="out", **changes):
    """The trainer folder dictionary_learning's own trainSAE writes (steps=0: the weights as built)."""
    cfg, _ = CLASSES[dict_class]
    data = Data()
    data.config = {**Data.config, "io": io}
    trainSAE(data=data, trainer_configs=[{**COMMON, **cfg, **changes, "trainer": random_init(cfg["trainer"])}],
             steps=0, save_dir=str(folder), device="cpu")
    return folder / "trainer_0"


def save_autoencoder_new(folder):
    """No 0.1.0 trainer writes dict_class "AutoEncoderNew" (StandardTrainer's config always says "AutoEncoder"),
    so this replicates trainSAE's saving lines (training.py: config.json, then t.save of the state dict)."""
    ae = AutoEncoderNew(D, F)
    randomize(ae)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"trainer": {**COMMON, "dict_class": "AutoEncoderNew"}}, indent=4))
    torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, folder / "ae.pt")
    return folder


@pytest.mark.parametrize("dict_class", [*CLASSES, "AutoEncoderNew"])
def test_features_and_outputs_match_dictionary_learning(tmp_path, dict_class):
    if dict_class == "AutoEncoderNew":
        folder, type_name = save_autoencoder_new(tmp_path / "new"), "relu"
    else:
        folder, type_name = train_and_save(tmp_path, dict_class), CLASSES[dict_class][1]
    theirs, _ = utils.load_dictionary(str(folder), device="cpu")  # AutoEncoder: decoder renormalised, as ours
    ours = load_dictionary(folder)
    assert (ours.type_name, ours.site, ours.cfg.model) == (type_name, "resid_post.2", "tiny/lm")
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f = theirs.encode(x)
        assert 0.05 < (f > 0).float().mean() < 0.6  # a realistic share of features fires
        torch.testing.assert_close(ours.encode(x), f, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.decode(f), theirs.decode(f), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("submodule, io, site", [("mlp_out_layer_2", "out", "mlp_out.2"), ("mlp_2", "in", "mlp_in.2"),
                                                 ("attn_out_layer_2", "out", "attn_out.2"),
                                                 ("resid_layer_2", "in", "resid_pre.2")])
def test_site_from_submodule_and_io(tmp_path, submodule, io, site):
    folder = train_and_save(tmp_path, "AutoEncoderTopK", io=io, submodule_name=submodule)
    assert load_dictionary(folder).site == site


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return train_and_save(tmp_path_factory.mktemp("dl"), "AutoEncoderTopK")


def test_detect_claims_only_its_own_layout(tmp_path, saved):
    assert next(f.name for f in formats() if f.detect(saved)) == "dictionary_learning"
    sparsify = tmp_path / "layers.2"
    sparsify.mkdir()
    (sparsify / "cfg.json").write_text("{}")
    (sparsify / "sae.safetensors").write_bytes(b"")
    ours = save_dictionary(load_dictionary(saved), tmp_path / "ours")
    dl = next(f for f in formats() if f.name == "dictionary_learning")
    assert not dl.detect(sparsify) and not dl.detect(ours) and not dl.detect(saved / "ae.pt")
    assert [f.name for f in formats() if f.detect(ours)] == ["saelens"]


class Evil:
    """A pickle that makes a folder when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _pickle(obj, path):
    path.write_bytes(pickle.dumps(obj, protocol=2))  # protocol 2, as torch.save, to reach the call itself


@pytest.mark.parametrize("save, careless_load", [(torch.save, lambda p: torch.load(p, weights_only=False)),
                                                 (_pickle, lambda p: pickle.loads(p.read_bytes()))],
                         ids=["torch.save", "pickle"])
def test_a_pickle_that_would_run_code_is_refused_unrun(tmp_path, saved, save, careless_load):
    folder, marker = shutil.copytree(saved, tmp_path / "d"), tmp_path / "ran"
    save({"b_dec": Evil(marker)}, folder / "ae.pt")
    with pytest.raises(DictionaryError, match=r"ae\.pt is not a plain tensor state dict; it was refused without "
                                              r"being run .*unsupported GLOBAL \w+\.mkdir"):
        load_dictionary(folder)
    assert not marker.exists()
    careless_load(folder / "ae.pt")  # the file is live: unpickled carelessly, it runs
    assert marker.exists()


def _config(folder, **trainer):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "trainer": {**config["trainer"], **trainer}}))


def _state(folder, **tensors):
    state = torch.load(folder / "ae.pt", weights_only=True)
    torch.save({**state, **tensors}, folder / "ae.pt")


@pytest.mark.parametrize("corrupt, match", [
    (lambda f: (f / "config.json").write_text((f / "config.json").read_text()[:40]), r"config\.json is not valid JSON"),
    (lambda f: (f / "ae.pt").write_bytes((f / "ae.pt").read_bytes()[:200]), r"ae\.pt is not a readable torch.save"),
    (lambda f: torch.save({"step": 3, "ae": {}}, f / "ae.pt"), r"ae\.pt is not a plain tensor state dict"),
    (lambda f: _state(f, **{"encoder.weight": torch.zeros(F, D + 1)}), r"ae\.pt: encoder.weight has shape \(64, 17\)"),
    (lambda f: _state(f, b_dec=torch.full((D,), float("nan"))), r"ae\.pt: b_dec contains NaN"),
    (lambda f: (_config(f, k=F + 1), _state(f, k=torch.tensor(F + 1))), r"config\.json: k=65 is out of range"),
    (lambda f: _config(f, k=K + 1), r"config\.json: k=7 differs from ae\.pt's k=6"),
    (lambda f: _config(f, dict_class="Mystery"), r"config\.json: dict_class 'Mystery' is not supported"),
    (lambda f: _config(f, submodule_name="embed"), r"config\.json: submodule_name 'embed' with io 'out' has no"),
    (lambda f: (f / "config.json").unlink(), r"config\.json is missing"),
])
def test_bad_files_are_clear_errors(tmp_path, saved, corrupt, match):
    folder = shutil.copytree(saved, tmp_path / "d")
    corrupt(folder)
    with pytest.raises(DictionaryError, match=match) as error:
        load_dictionary(folder)
    assert str(folder) in str(error.value) and "\n" not in str(error.value)
