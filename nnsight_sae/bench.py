"""Benchmarks: each reports a ratio of ours to a baseline measured in the same
run, interleaved (baseline, ours, baseline, ours, ...), so machine noise hits
both alike. ``nnsight-sae bench harvest|train|splice --out DIR``."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from .atomic import write_json


class _Stop(Exception):
    pass


def _timed(fn) -> float:
    """Seconds ``fn()`` takes (GPU work waited for, so the time is its own)."""
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _interleave(baseline, ours, rounds: int, warmup: int = 2) -> tuple[float, float]:
    """Total seconds of each over ``rounds`` alternating runs, after warm-up."""
    for _ in range(warmup):
        _timed(baseline)
        _timed(ours)
    tb = to = 0.0
    for _ in range(rounds):
        tb += _timed(baseline)
        to += _timed(ours)
    return tb, to


def _setup(device, **extra) -> dict:
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": f"{device} ({name})",
            **extra}


def _device(model) -> torch.device:
    return next(model._module.parameters()).device


def _tokens(model, batch: int, ctx: int) -> torch.Tensor:
    from .corpus import contexts, embedded_corpus

    return contexts(embedded_corpus("code", "test"), model.tokenizer, ctx, batch * ctx)[:batch]


def bench_harvest(model, out: Path, *, layers=(3, 15), batch=8, ctx=128, rounds=10) -> list[dict]:
    """Tokens/s of our activation stream vs a plain forward hook that raises to stop."""
    from .harvest import harvest
    from .sites import architecture_of, submodule, torch_module

    ids = _tokens(model, batch, ctx)
    mask = torch.ones_like(ids)
    on_device = {"input_ids": ids.to(_device(model)), "attention_mask": mask.to(_device(model))}
    arch = architecture_of(model)
    results = []
    for layer in layers:
        site = f"resid_post.{layer}"
        module = submodule(torch_module(model), f"{arch.layers}.{layer}")
        got = {}

        def hook(_module, _inputs, output):
            got["x"] = (output[0] if isinstance(output, tuple) else output).detach()
            raise _Stop

        def baseline():
            handle = module.register_forward_hook(hook)
            try:
                with torch.no_grad():
                    torch_module(model)(**on_device)
            except _Stop:
                pass
            finally:
                handle.remove()
            got["rows"] = got["x"][on_device["attention_mask"].bool()].float().cpu()

        def ours():
            for rows in harvest(model, [site], ids, attention_mask=mask, batch_size=batch, progress=False):
                got["ours"] = rows[site]

        tb, to = _interleave(baseline, ours, rounds)
        assert torch.equal(got["ours"], got["rows"]), "the two paths read different activations"
        n = ids.numel() * rounds
        result = {"what": f"harvest {site}", "ratio": round((n / to) / (n / tb), 4), "ours": round(n / to, 1),
                  "baseline": round(n / tb, 1), "unit": "tokens/s (ratio: ours / baseline, higher is better)",
                  "setup": _setup(_device(model), batch=batch, ctx=ctx, rounds=rounds,
                                  baseline="torch forward hook raising to stop at the layer")}
        write_json(out / f"harvest-{site}.json", result)
        results.append(result)
    return results


def bench_splice(model, out: Path, *, layer=15, batch=8, ctx=128, rounds=10, d_sae=None) -> list[dict]:
    """Seconds per trace with a TopK SAE spliced in vs the same trace without it."""
    from .attach import attach
    from .plugins import create_dictionary
    from .sites import resolve_site

    ids = _tokens(model, batch, ctx)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    site = f"resid_post.{layer}"
    d_in = resolve_site(model, site).d_in
    sae = create_dictionary("topk", d_in=d_in, d_sae=d_sae or 8 * d_in, site=site, k=32)
    att = attach(model, sae)

    def baseline():
        with torch.no_grad(), model.trace(inputs):
            model.output.logits.save()

    def ours():
        with torch.no_grad(), model.trace(inputs):
            att.splice(error=True)
            model.output.logits.save()

    tb, to = _interleave(baseline, ours, rounds)
    result = {"what": f"splice topk d_sae={sae.d_sae} at {site}", "ratio": round(to / tb, 4),
              "ours": round(to / rounds, 4), "baseline": round(tb / rounds, 4),
              "unit": "seconds per trace (ratio: ours / baseline, lower is better)",
              "setup": _setup(_device(model), batch=batch, ctx=ctx, rounds=rounds,
                             baseline="the same trace without the SAE")}
    write_json(out / "splice.json", result)
    return [result]


class _Sparsify:
    """EleutherAI sparsify's TopK training step, with its own SparseCoder, as its Trainer.fit
    runs it per batch (sparsify 1.3.3, trainer.py): b_dec set to the first batch's mean, decoder
    rows renormalised before the forward, loss = FVU + auxk_alpha x AuxK over latents silent for
    ``dead_after`` tokens, the decoder gradient's radial part removed, Adam (its "adam" option:
    torch.optim.Adam with a linear warm-up and decay, here our warm-up and decay), the fired
    counters updated, and a checkpoint as its Trainer._checkpoint writes one."""

    def __init__(self, d_in, d_sae, k, *, lr, schedule, dead_after, auxk_alpha, device):
        from sparsify import SparseCoder, SparseCoderConfig

        self.sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device, dtype=torch.float32)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)
        self.since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.dead_after, self.auxk_alpha, self.steps = dead_after, auxk_alpha, 0
        self.aux_steps = 0

    def step(self, x):
        sae = self.sae
        if self.steps == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead = self.since_fired > self.dead_after
        self.aux_steps += bool(dead.any())
        out = sae(x=x, y=x, dead_mask=dead, total_variance=(x - x.mean(0)).pow(2).sum())
        fired = torch.zeros_like(dead)
        fired[out.latent_indices.flatten()] = True
        (out.fvu + self.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        self.scheduler.step()
        self.since_fired += len(x)
        self.since_fired[fired] = 0
        self.steps += 1

    def checkpoint(self, folder: Path):
        self.sae.save_to_disk(folder / "sae")
        torch.save(self.opt.state_dict(), folder / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), folder / "lr_scheduler.pt")

    def fvu(self, x):
        with torch.no_grad():
            return float(self.sae(x).fvu)


class _PlainLoop:
    """The textbook TopK loop: encode, top-k, dense decode, MSE, Adam, renormalise (no revival)."""

    def __init__(self, d_in, d_sae, k, *, lr, device):
        g = torch.Generator().manual_seed(0)
        self.W_enc = torch.nn.Parameter((torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5).to(device))
        self.W_dec = torch.nn.Parameter(self.W_enc.detach().T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae, device=device))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in, device=device))
        self.k = k
        self.opt = torch.optim.Adam([self.W_enc, self.W_dec, self.b_enc, self.b_dec], lr=lr)

    def recon(self, x):
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        v, i = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, i, torch.relu(v)) @ self.W_dec + self.b_dec

    def step(self, x):
        loss = (self.recon(x) - x).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))

    def fvu(self, x):
        from .train import fvu

        with torch.no_grad():
            return fvu(x, self.recon(x))


def bench_train(model, out: Path, *, site="resid_post.6", d_sae=4608, k=32, batch=256, steps=2000,
                tokens=None, eval_tokens=8192, data=None, chunk=50, checkpoint_every=500, lr=4e-4,
                device=None) -> list[dict]:
    """Training steps/s of our Trainer against EleutherAI sparsify's training step and a plain TopK
    loop, on the same real activations (``site`` of ``model``, harvested once and cached; every
    trainer sees the same batches in the same order, scaled once to mean norm sqrt(d_in)), in
    interleaved chunks of ``chunk`` steps. Long enough that features die and the auxiliary loss
    runs (a feature counts as dead after a tenth of the run's rows, as in ``nnsight-sae train``),
    with checkpoints every ``checkpoint_every`` steps for ours and sparsify's. Also the FVU each
    reaches on held-out rows after the same steps. ``data``: a local corpus file instead of the
    embedded code corpus (fixed here, whatever the default, so figures stay comparable)."""
    import tempfile

    from .harvest import harvest
    from .pipeline import DataSpec, activation_store, token_contexts
    from .plugins import create_dictionary
    from .train import Member, TrainConfig, Trainer, fvu, input_scale

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = DataSpec(corpus=None if data else "code", data=data, tokens=tokens or steps * batch + 4096,
                    eval_tokens=eval_tokens)
    store = activation_store(model, [site], data, progress=False)
    d_in = store.shapes[site][-1]
    scale = input_scale(store.rows(site, slice(0, min(store.n_rows, 20_000))))
    held_out = torch.cat([r[site] for r in harvest(model, [site], token_contexts(model, data, held_out=True),
                                                   drop_bos=True, progress=False)]).to(device) * scale
    dead_after = steps * batch // 10
    config = TrainConfig(steps=steps, lr=lr, dead_after_rows=dead_after)
    ours = Trainer([Member(create_dictionary("topk", d_in=d_in, d_sae=d_sae, site=site, k=k).to(device))], config)
    sparsify = _Sparsify(d_in, d_sae, k, lr=lr, schedule=ours.lr_factor, dead_after=dead_after,
                         auxk_alpha=ours.members[0].dictionary.cfg.auxk_coefficient, device=device)
    plain = _PlainLoop(d_in, d_sae, k, lr=lr, device=device)
    member = ours.members[0]
    seconds = {"ours": 0.0, "sparsify": 0.0, "plain": 0.0}
    aux_steps = 0

    def batches():
        epoch = 0
        while True:
            for b in store.batches(batch, seed=0, epoch=epoch):
                yield b[site].to(device) * scale
            epoch += 1

    stream = batches()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for start in range(0, steps, chunk):
            xs = [next(stream) for _ in range(min(chunk, steps - start))]
            due = [start + i + 1 for i in range(len(xs)) if (start + i + 1) % checkpoint_every == 0]

            def run_sparsify():
                for i, x in enumerate(xs):
                    sparsify.step(x)
                    if start + i + 1 in due:
                        sparsify.checkpoint(scratch / "sparsify")

            def run_ours():
                nonlocal aux_steps
                for i, x in enumerate(xs):
                    aux_steps += bool((member.rows_since_fired >= dead_after).any())
                    ours.step({site: x}, stats=False)
                    if start + i + 1 in due:
                        ours.save_checkpoint(scratch / "ours")

            def run_plain():
                for x in xs:
                    plain.step(x)

            for name, fn in (("sparsify", run_sparsify), ("ours", run_ours), ("plain", run_plain)):
                seconds[name] += _timed(fn)
    with torch.no_grad():
        d = member.dictionary
        fvus = {"ours": fvu(held_out, d(held_out)), "sparsify": sparsify.fvu(held_out), "plain": plain.fvu(held_out)}
    rate = {name: steps / t for name, t in seconds.items()}
    result = {"what": f"train topk d_sae={d_sae} k={k} batch={batch} on {site} activations",
              "ratio": round(rate["ours"] / rate["sparsify"], 4), "ours": round(rate["ours"], 2),
              "baseline": round(rate["sparsify"], 2),
              "unit": "steps/s (ratio: ours / sparsify's step, higher is better)",
              "setup": _setup(device, steps=steps, rows=store.n_rows, held_out_rows=len(held_out), chunk=chunk,
                              checkpoint_every=checkpoint_every, dead_after_rows=dead_after,
                              baseline="EleutherAI sparsify 1.3.3's SparseCoder and Trainer.fit step (Adam, AuxK)",
                              plain_loop_steps_per_s=round(rate["plain"], 2),
                              ratio_to_plain_loop=round(rate["ours"] / rate["plain"], 4),
                              held_out_fvu={n: round(v, 4) for n, v in fvus.items()},
                              aux_active_steps={"ours": aux_steps, "sparsify": sparsify.aux_steps},
                              dead_fraction_end=round(float((member.rows_since_fired >= dead_after).float().mean()),
                                                      4))}
    write_json(out / "train.json", result)
    return [result]


def bench_circuit(model, out: Path, *, task="ioi", method=None, n_prompts=40, rounds=2) -> list[dict]:
    """Seconds of a circuit method vs the exhaustive per-head patching reference it
    approximates, on the same prompts: circuit, reference, circuit, ... (``rounds``
    circuit runs around one reference run, which takes minutes)."""
    import tempfile

    from .circuits import circuit_method, run_circuit, run_reference

    method = circuit_method(method).name
    circuit_seconds = []
    with tempfile.TemporaryDirectory() as scratch:
        def ours():
            result = run_circuit(model, task, Path(scratch) / "circuit", method=method, n_prompts=n_prompts,
                                 progress=False)
            circuit_seconds.append(result["seconds"]["total"])  # discovery only, not the faithfulness check

        ours()
        reference = run_reference(model, task, Path(scratch) / "reference", n_prompts=n_prompts, progress=False)
        for _ in range(rounds - 1):
            ours()
    to = sum(circuit_seconds) / len(circuit_seconds)
    tb = reference["seconds"]
    result = {"what": f"circuit {task} --method {method}", "ratio": round(tb / to, 2), "ours": round(to, 4),
              "baseline": round(tb, 4), "unit": "seconds (ratio: reference / ours, the speed-up)",
              "setup": _setup(_device(model), n_prompts=n_prompts, circuit_runs=len(circuit_seconds),
                              baseline="exhaustive single-head mean ablation (nnsight-sae reference)")}
    write_json(out / f"circuit-{Path(task).name.removesuffix('.jsonl')}.json", result)
    return [result]
