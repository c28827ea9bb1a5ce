"""The trainer on synthetic sparse data (it knows nothing of models)."""

import pytest
import torch

from nnsight_sae import create_dictionary
from nnsight_sae.train import Member, TrainConfig, Trainer, TrainingError, fvu, input_scale, train

D_IN, N_TRUE = 32, 96


def sparse_data(n_rows, seed=0, d_in=D_IN):
    """Rows that are sparse non-negative combinations of N_TRUE ground-truth directions."""
    g = torch.Generator().manual_seed(1234)
    dirs = torch.randn(N_TRUE, d_in, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(n_rows, N_TRUE, generator=g) < 4 / N_TRUE
    coef = active * torch.rand(n_rows, N_TRUE, generator=g) * 3
    return (coef @ dirs + 0.5).float()  # an offset, so b_dec has work to do


def batches(site, n_steps, batch=256, seed=0, out_site=None, start=0):
    for i in range(start, n_steps):
        x = sparse_data(batch, seed=seed * 10_000 + i)
        yield {site: x} if out_site is None else {site: x, out_site: 2 * x.flip(-1)}


HYPER = {"relu": {"l1_coefficient": 1e-2}, "topk": {"k": 6}, "batchtopk": {"k": 6},
         "jumprelu": {"l1_coefficient": 1e-2}, "gated": {"l1_coefficient": 1e-2},
         "transcoder": {"l1_coefficient": 1e-3, "out_site": "mlp_out.0"}, "discrete": {"l1_coefficient": 2e-2}}


def make(type_name, seed=0, d_sae=128):
    site = "mlp_in.0" if type_name == "transcoder" else "resid_post.0"
    d = create_dictionary(type_name, d_in=D_IN, d_sae=d_sae, site=site, **HYPER[type_name])
    d.reset_parameters(seed=seed)
    return d


def run(type_name, steps=800, **config):
    d = make(type_name)
    data = sparse_data(4096, seed=99)
    member = Member(d, input_scale(data), input_scale(2 * data) if type_name == "transcoder" else input_scale(data))
    trainer = Trainer([member], TrainConfig(steps=steps, lr=3e-3, warmup_steps=20, dead_after_rows=20_000, **config))
    train(trainer, batches(d.site, steps, out_site=d.out_site), progress=False)
    return trainer.finished()[0]


@pytest.mark.parametrize("type_name", ["relu", "topk", "batchtopk", "jumprelu", "gated", "transcoder", "discrete"])
def test_every_type_beats_the_trivial_baseline(type_name):
    d = run(type_name)
    x = sparse_data(2048, seed=77)
    target = 2 * x.flip(-1) if type_name == "transcoder" else x
    with torch.no_grad():
        recon = d(x)
        l0 = (d.encode(x) != 0).sum(-1).float().mean()
    # predicting the mean has FVU 1; a working dictionary explains most of the variance sparsely
    assert fvu(target, recon) < 0.25, fvu(target, recon)
    assert l0 < 0.3 * d.d_sae  # and sparsely: 128 features, about 4 truly active per row
    assert torch.allclose(d.W_dec.norm(dim=1), torch.ones(d.d_sae), atol=1e-5)


def test_topk_types_have_exactly_k_or_fewer_active():
    d = run("topk", steps=100)
    assert ((d.encode(sparse_data(100)) != 0).sum(-1) <= 6).all()
    b = run("batchtopk", steps=200)
    assert b.threshold.min() > 0  # learned inference threshold, folded for raw inputs
    assert 1 < (b.encode(sparse_data(500)) != 0).sum(-1).float().mean() < 20


def test_resume_gives_the_same_weights_as_an_unbroken_run(tmp_path):
    steps, config = 60, dict(lr=3e-3, warmup_steps=5, dead_after_rows=2_000, resample_every=20)

    def trainer():
        return Trainer([Member(make("relu"), 0.7, 0.7)], TrainConfig(steps=steps, **config))

    whole = trainer()
    train(whole, batches("resid_post.0", steps), progress=False)

    first = trainer()
    first.config.checkpoint_every = 25
    with pytest.raises(TrainingError, match="data ran out after 30"):
        train(first, batches("resid_post.0", 30), checkpoint_dir=tmp_path / "ckpt", progress=False)
    resumed = trainer()
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.step_count == 25
    train(resumed, batches("resid_post.0", steps, start=25), checkpoint_dir=tmp_path / "ckpt", progress=False)
    for key, value in whole.members[0].dictionary.state_dict().items():
        assert torch.equal(resumed.members[0].dictionary.state_dict()[key], value), key


def test_nan_stops_with_step_and_site_and_keeps_the_checkpoint(tmp_path):
    d = make("topk")
    trainer = Trainer([Member(d)], TrainConfig(steps=10, checkpoint_every=2))

    def poisoned():
        for i, b in enumerate(batches("resid_post.0", 10)):
            if i == 5:
                b["resid_post.0"][3, 4] = float("nan")
            yield b

    with pytest.raises(TrainingError, match="at step 5 for the topk dictionary at resid_post.0"):
        train(trainer, poisoned(), checkpoint_dir=tmp_path / "ckpt", progress=False)
    fresh = Trainer([Member(make("topk"))], TrainConfig(steps=10))
    fresh.load_checkpoint(tmp_path / "ckpt")
    assert fresh.step_count == 4
    assert all(torch.isfinite(p).all() for p in fresh.members[0].dictionary.parameters())


@pytest.mark.parametrize("type_name", ["relu", "topk", "batchtopk", "jumprelu", "gated", "transcoder"])
def test_folding_the_input_scale_gives_the_same_outputs_on_raw_activations(type_name):
    d = make(type_name)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if name != "W_dec":
                p.add_(torch.rand(p.shape) * 0.1)
        if hasattr(d, "W_skip"):
            d.W_skip.copy_(torch.randn(d.W_skip.shape) * 0.1)
    if type_name == "transcoder":
        d.cfg.skip = True
        d.W_skip = torch.nn.Parameter(torch.randn(D_IN, D_IN) * 0.1)
    x = sparse_data(64)
    s_in, s_out = 2.5, (0.4 if type_name == "transcoder" else 2.5)
    with torch.no_grad():
        scaled = d(x * s_in) / s_out
        d.fold_input_scale(s_in, s_out)
        torch.testing.assert_close(d(x), scaled, rtol=1e-4, atol=1e-5)
    assert torch.allclose(d.W_dec.norm(dim=1), torch.ones(d.d_sae), atol=1e-5)


def test_several_dictionaries_train_in_lockstep():
    members = [Member(make("topk", d_sae=64)), Member(make("relu", d_sae=128)),
               Member(make("transcoder"), 1.0, 1.0)]
    trainer = Trainer(members, TrainConfig(steps=30, lr=3e-3, warmup_steps=5))

    def both():
        for b in batches("resid_post.0", 30):
            x = b["resid_post.0"]
            yield {"resid_post.0": x, "mlp_in.0": x, "mlp_out.0": 2 * x.flip(-1)}

    stats = train(trainer, both(), progress=False)
    assert len(stats) == 3 and trainer.step_count == 30


def test_relu_resampling_revives_dead_features():
    d = make("relu", d_sae=64)
    with torch.no_grad():
        d.W_enc[:, :32] = -1.0  # half the features can never fire
        d.b_enc[:32] = -100.0
    trainer = Trainer([Member(d)], TrainConfig(steps=80, lr=1e-3, warmup_steps=5, dead_after_rows=256 * 10,
                                               resample_every=40))
    train(trainer, batches("resid_post.0", 80), progress=False)
    with torch.no_grad():
        fired = (d.encode(sparse_data(4096, seed=5)) > 0).any(0)
    assert fired[:32].sum() >= 16


def test_k_warmup_starts_wide_and_ends_at_k():
    d = create_dictionary("topk", d_in=D_IN, d_sae=128, site="resid_post.0", k=6, k_warmup=True)
    trainer = Trainer([Member(d)], TrainConfig(steps=20, sparsity_warmup=0.5))
    l0 = [trainer.step(b)[0]["l0"] for b in batches("resid_post.0", 20)]
    assert l0[0] > 20 and l0[-1] == 6 and all(a >= b for a, b in zip(l0, l0[1:]))


def _textbook_topk_loss(d, x, target, dead, k, batch_level):
    """The top-k losses written the plain way, with dense autograd everywhere: the reference
    the sparse backward must equal."""
    pre = (x - d.b_dec if d.cfg.apply_b_dec_to_input else x) @ d.W_enc + d.b_enc
    if batch_level:
        flat = torch.relu(pre).reshape(-1)
        picked = flat.topk(k * len(x)).indices
        f = torch.zeros_like(flat).index_put((picked,), flat[picked]).reshape(pre.shape)
    else:
        values, indices = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
    recon = f @ d.W_dec + d.b_dec
    mse = (recon - target).pow(2).mean()
    k_aux = min(d.cfg.k_aux or d.d_in // 2, int(dead.sum()))
    if k_aux == 0:
        return mse
    masked = pre.masked_fill(~dead, float("-inf"))
    v, i = masked.topk(k_aux, dim=-1)
    error = (target - recon).detach()
    error_hat = torch.zeros_like(pre).scatter(-1, i, torch.relu(v)) @ d.W_dec
    scale = (error - error.mean(0)).pow(2).sum(-1).mean()
    return mse + d.cfg.auxk_coefficient * (error_hat - error).pow(2).sum(-1).mean() / scale


@pytest.mark.parametrize("type_name", ["topk", "batchtopk"])
@pytest.mark.parametrize("n_dead", [0, 5, 40])  # none; fewer than k_aux (no top-k among them); more
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("centred", [True, False])  # apply_b_dec_to_input
def test_each_training_path_has_autograds_gradients(type_name, n_dead, sparse, centred):
    d = create_dictionary(type_name, d_in=16, d_sae=64, site="resid_post.0", k=4, k_aux=8, dtype="float64",
                          apply_b_dec_to_input=centred)
    g = torch.Generator().manual_seed(n_dead)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    x = torch.randn(24, 16, generator=g, dtype=torch.float64)
    target = x + 0.1 * torch.randn(24, 16, generator=g, dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64, generator=g)[:n_dead]] = True
    out = d.training_loss(x, target, dead=dead, sparse=sparse)
    ours = torch.autograd.grad(out["loss"], [d.W_enc, d.b_enc, d.W_dec, d.b_dec])
    reference = _textbook_topk_loss(d, x, target, dead, 4, type_name == "batchtopk")
    expected = torch.autograd.grad(reference, [d.W_enc, d.b_enc, d.W_dec, d.b_dec])
    torch.testing.assert_close(out["loss"], reference, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("W_enc", "b_enc", "W_dec", "b_dec"), ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert out["l0"] <= 4 and out["fired"].sum() > 0
