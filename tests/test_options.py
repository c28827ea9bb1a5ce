"""Declared options: checked where they are made, and the command line generated from them."""

import subprocess
import sys

import pytest
import torch

from nnsight_sae import DictionaryError, OptionError, create_dictionary, load_dictionary, save_dictionary
from nnsight_sae.files import CFG_FILE
from nnsight_sae.options import Option, Options


class Settings(Options):
    n = Option(int, 5, "how many", min=1)
    rate = Option(float, 0.5, "a rate", min=0.0)
    mode = Option(str, "a", "a mode", choices=("a", "b"))
    names = Option(str, [], "some names", many=True)
    flag = Option(bool, False, "a flag")
    needed = Option(int, help="no default")


def test_values_are_checked_when_made():
    s = Settings(needed=1, rate=2)
    assert (s.n, s.rate, s.mode, s.names, s.flag) == (5, 2.0, "a", [], False) and isinstance(s.rate, float)
    assert s.replace(n=7).n == 7 and s.replace(n=7) != s and Settings(needed=1, rate=2.0) == s
    for bad, match in [({"n": 0}, "n must be at least 1, got 0"), ({"n": "3"}, "n must be an integer, not '3'"),
                       ({"n": True}, "n must be an integer"), ({"mode": "c"}, "mode must be one of a, b"),
                       ({"names": "x"}, "names takes a list of str"), ({"flag": 1}, "flag must be true or false"),
                       ({"nope": 1}, "unknown option nope; Settings takes n, rate, mode, names, flag, needed")]:
        with pytest.raises(OptionError, match=match):
            Settings(**{"needed": 1, **bad})
    with pytest.raises(OptionError, match="needed is required"):
        Settings()


@pytest.mark.parametrize("k, match", [(0, "k must be at least 1, got 0"), (-3, "k must be at least 1"),
                                      (65, "k=65 is more than the dictionary's 64 features"),
                                      ("32", "k must be an integer, not '32'")])
def test_a_topk_k_out_of_range_is_an_error_at_construction_and_at_load(tmp_path, k, match):
    with pytest.raises(OptionError, match=match):
        create_dictionary("topk", d_in=32, d_sae=64, site="resid_post.1", k=k)
    folder = save_dictionary(create_dictionary("topk", d_in=32, d_sae=64, site="resid_post.1", k=8), tmp_path / "d")
    text = (folder / CFG_FILE).read_text().replace('"k": 8', f'"k": {k!r}'.replace("'", '"'))
    (folder / CFG_FILE).write_text(text)
    with pytest.raises(DictionaryError, match=f"cfg.json: {match}"):
        load_dictionary(folder)


def test_each_type_owns_its_options():
    d = create_dictionary("transcoder", d_in=32, d_sae=64, site="mlp_in.3")
    assert d.out_site == "mlp_out.3" and d.d_out == 32  # resolved by the type, not by the caller
    assert create_dictionary("relu", d_in=8, d_sae=16, site="resid_post.0").out_site is None
    assert d.cfg.hyper_parameters() == {"skip": False, "l1_coefficient": 5e-4}
    with pytest.raises(OptionError, match="a transcoder reads mlp_in.L"):
        create_dictionary("transcoder", d_in=32, d_sae=64, site="resid_post.3")
    with pytest.raises(OptionError, match="unknown option cap"):
        create_dictionary("topk", d_in=32, d_sae=64, site="resid_post.1", cap=4.0)


def test_a_dictionary_ships_no_dataclass_or_typing_object():
    """Its config travels inside remote requests: plain objects only (see remote_check)."""
    import cloudpickle

    from nnsight_sae.remote import _register_ours, imported_modules

    d = create_dictionary("topk", d_in=8, d_sae=16, site="resid_post.0", k=2)
    _register_ours()
    try:
        modules = imported_modules(cloudpickle.dumps(d))
    finally:
        _register_ours(False)
    assert not {m for m in modules if m.split(".")[0] in ("dataclasses", "functools", "_functools", "typing")}
    assert torch.equal(cloudpickle.loads(cloudpickle.dumps(d)).W_enc, d.W_enc)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "nnsight_sae", *map(str, args)], capture_output=True, text=True)


def test_train_and_circuit_flags_come_from_the_declarations():
    train = _cli("train", "--help").stdout
    assert "--l1-coefficient L1_COEFFICIENT, --l1 L1_COEFFICIENT" in train and "relu: 0.002" in train
    assert "--tied, --no-tied" in train and "--threshold-momentum" in train
    circuit = _cli("circuit", "--help").stdout
    assert "--reduce {mean,last}" in circuit and "--n-features" in circuit
    wrong = _cli("circuit", "--task", "ioi", "--method", "attribution", "--reduce", "last", "--out", "/tmp/never")
    assert wrong.returncode == 2
    assert "--reduce is not an option of --method attribution (it is one of code-overlap, code-overlap-edges, " \
           "mean-diff)" in wrong.stderr
    bad = _cli("circuit", "--task", "ioi", "--method", "code-overlap", "--n-features", "0", "--out", "/tmp/never")
    assert bad.returncode == 2 and "circuit method 'code-overlap': n_features must be at least 1" in bad.stderr


def test_a_task_recommends_settings_to_a_method():
    from nnsight_sae.circuits import circuit_method, method_options
    from nnsight_sae.tasks import get_task

    method = circuit_method("code-overlap")
    assert method_options(method, get_task("docstring")).l1 == 0.05  # the paper's docstring setting
    assert method_options(method, get_task("ioi")).l1 == 0.02
    assert method_options(method, get_task("docstring"), {"l1": 0.1}).l1 == 0.1  # the user's own wins
    assert circuit_method().name == "attribution"  # the default, as its plugin declares
