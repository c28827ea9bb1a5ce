"""The command line: contracts, bad input, train/eval end to end on a tiny model, kill and resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from nnsight_sae.testing import make_tiny_model

CLI = [sys.executable, "-m", "nnsight_sae"]


def cli(*args, check=False, **kw):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, check=check, **kw)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    return make_tiny_model("gpt2", tmp_path_factory.mktemp("gpt2"))


def assert_one_line_exit_2(result):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_help_for_every_command():
    for cmd in ([], ["info"], ["train"], ["eval"], ["analyze"]):
        assert cli(*cmd, "--help").returncode == 0


@pytest.mark.parametrize("args, match", [
    (["train", "--type", "nosuch", "--site", "resid_post.0"], "unknown dictionary type 'nosuch'"),
    (["train", "--type", "topk", "--site", "resid_post.9"], "layer 9 out of range"),
    (["train", "--type", "topk", "--site", "resid_middle.0"], "malformed site"),
    (["train", "--type", "topk", "--site", "resid_post.0", "--ctx-len", "4096"], "longer than the model allows"),
    (["train", "--type", "topk", "--site", "resid_post.0", "--data", "/no/such.txt"], "no such data file"),
    (["train", "--type", "transcoder", "--site", "resid_post.0"], "a transcoder reads mlp_in.L"),
    (["train", "--type", "topk", "--site", "resid_post.0", "--corpus", "prose", "--data", "x.txt"],
     "give one of --corpus, --dataset and --data"),
])
def test_bad_train_input_exits_2_and_writes_nothing(tmp_path, tiny_gpt2, args, match):
    out = tmp_path / "out"
    line = assert_one_line_exit_2(cli(*args, "--model", tiny_gpt2, "--out", out, "--tokens", 500))
    assert match in line
    assert not out.exists()


def test_bad_model_and_dictionary_exit_2(tmp_path):
    line = assert_one_line_exit_2(cli("train", "--type", "topk", "--site", "resid_post.0",
                                      "--model", tmp_path / "missing", "--out", tmp_path / "o"))
    assert "not a model folder" in line
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "cfg.json").write_text("{\"d_in\": 3")
    assert "not valid JSON" in assert_one_line_exit_2(cli("eval", tmp_path / "d", "--out", tmp_path / "e"))
    assert cli("analyze", "nosuch", "--dict", "x", "--out", "y").returncode == 2


TRAIN = ["train", "--type", "topk", "--site", "resid_post.1", "--d-sae", 128, "--k", 8, "--tokens", 20_000,
         "--epochs", 2, "--batch-size", 32, "--ctx-len", 32, "--eval-tokens", 512, "--checkpoint-every", 50]


def test_train_then_eval(tmp_path, tiny_gpt2):
    out = tmp_path / "d"
    result = cli(*TRAIN, "--model", tiny_gpt2, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "eval.json", "sae_weights.safetensors"]
    ev = json.loads((out / "eval.json").read_text())
    printed = json.loads(result.stdout)
    assert printed[0]["fvu"] == ev["fvu"] and ev["l0"] <= 8 and 0 <= ev["fvu"] < 1
    for key in ("mse", "explained_variance", "cosine_similarity", "ce_clean", "ce_spliced", "ce_zero_ablation",
                "ce_loss_recovered", "kl_div", "dead_fraction", "dense_fraction"):
        assert key in ev
    again = cli("eval", out, "--model", tiny_gpt2, "--out", tmp_path / "e", "--tokens", 512, "--ctx-len", 32)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["fvu"] == pytest.approx(ev["fvu"], rel=1e-5)
    assert "exists" in assert_one_line_exit_2(cli(*TRAIN, "--model", tiny_gpt2, "--out", out))


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, tiny_gpt2):
    whole = cli(*TRAIN, "--model", tiny_gpt2, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen([*CLI, *map(str, TRAIN), "--model", str(tiny_gpt2), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "sae_weights.safetensors").exists()
    resumed = cli(*TRAIN, "--model", tiny_gpt2, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(tmp_path / "whole" / "sae_weights.safetensors")
    b = load_file(out / "sae_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_data_parallel_training_under_accelerate_launch(tmp_path, tiny_gpt2):
    """Two CPU processes (gloo): each harvests its shard, gradients are averaged, both end with
    the same weights, and the file the first process saves holds exactly them."""
    import hashlib

    out = tmp_path / "ddp"
    # --multi_gpu runs torchrun-style processes; without GPUs they join a gloo group on the CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "nnsight_sae",
           *map(str, TRAIN), "--epochs", "1", "--model", str(tiny_gpt2), "--out", str(out)]
    # CPU processes even on a GPU machine (one GPU cannot serve two ranks)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d): topk at resid_post.1 weights sha256 ([0-9a-f]{16})", result.stderr))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    saved = load_file(out / "sae_weights.safetensors")
    # the saved file holds the folded weights; the digest covers the state dict in the same order
    from nnsight_sae import load_dictionary

    d = load_dictionary(out)
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in d.state_dict().values())).hexdigest()[:16]
    assert digest == digests["0"] and set(saved) == set(d.state_dict())
    assert json.loads((out / "eval.json").read_text())["fvu"] < 1


def test_device_map_and_remote_flags(tiny_gpt2, tmp_path):
    from nnsight_sae import save_dictionary
    from nnsight_sae.testing import random_dictionary

    folder = save_dictionary(random_dictionary("resid_post.1"), tmp_path / "d")
    n = torch.cuda.device_count()
    line = assert_one_line_exit_2(cli("eval", folder, "--model", tiny_gpt2, "--device-map", f"cuda:{n}",
                                      "--out", tmp_path / "e"))
    assert f"device_map names cuda:{n}, but this machine has {n} CUDA device(s)" in line
    line = assert_one_line_exit_2(cli("eval", folder, "--model", tiny_gpt2, "--remote", "--out", tmp_path / "e"))
    assert "a local file or folder, cannot be sent: pass a Hub id" in line
    bad = cli("eval", folder, "--device-map", "{cpu", "--out", tmp_path / "e")
    assert bad.returncode == 2 and "--device-map is not valid JSON" in bad.stderr
    # a JSON device map and the simulated round trip both run
    ok = cli("eval", folder, "--model", tiny_gpt2, "--device-map", '{"": "cpu"}', "--remote", "local",
             "--tokens", 256, "--ctx-len", 32, "--out", tmp_path / "e")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["fvu"] > 0


def test_convert_between_layouts_and_bad_files(tmp_path):
    from nnsight_sae import load_dictionary, save_dictionary
    from nnsight_sae.testing import random_dictionary

    d = random_dictionary("resid_post.1", type_name="topk", k=4)
    save_dictionary(d, tmp_path / "ours")
    done = cli("convert", tmp_path / "ours", "--to", "sparsify", "--out", tmp_path / "layers.1")
    assert done.returncode == 0, done.stderr
    assert {p.name for p in (tmp_path / "layers.1").iterdir()} == {"cfg.json", "sae.safetensors"}
    back = cli("convert", tmp_path / "layers.1", "--out", tmp_path / "again")
    assert back.returncode == 0, back.stderr
    x = torch.randn(5, 32)
    torch.testing.assert_close(load_dictionary(tmp_path / "again").encode(x), d.encode(x))
    assert "--to 'gemma_scope'" in assert_one_line_exit_2(cli("convert", tmp_path / "ours", "--to", "gemma_scope",
                                                               "--out", tmp_path / "gs"))
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "config.json").write_text('{"trainer": {"dict_class": "AutoEncoder", "activation_dim": 32, '
                                                   '"dict_size": 64, "layer": 1, "submodule_name": "resid_1"}}')
    (tmp_path / "fake" / "ae.pt").write_bytes(b"\x80\x04\x95 not a state dict")  # a pickle header
    line = assert_one_line_exit_2(cli("convert", tmp_path / "fake", "--out", tmp_path / "never"))
    assert "ae.pt" in line and not (tmp_path / "never").exists()
