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


def _interleave(baseline, ours, rounds: int, warmup: int = 2) -> tuple[float, float]:
    """Total seconds of each over ``rounds`` alternating runs, after warm-up (GPU work
    waited for, so each run's time is its own)."""
    def timed(fn):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for _ in range(warmup):
        timed(baseline)
        timed(ours)
    tb = to = 0.0
    for _ in range(rounds):
        tb += timed(baseline)
        to += timed(ours)
    return tb, to


def _setup(device, **extra) -> dict:
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": f"{device} ({name})",
            **extra}


def _device(model) -> torch.device:
    return next(model._module.parameters()).device


def _tokens(model, batch: int, ctx: int) -> torch.Tensor:
    from .corpus import contexts, stdlib_corpus

    return contexts(stdlib_corpus("test"), model.tokenizer, ctx, batch * ctx)[:batch]


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


def bench_train(out: Path, *, d_in=576, d_sae=4608, k=32, batch=256, steps=30, rounds=3, device=None) -> list[dict]:
    """Training steps/s of our Trainer vs a straightforward TopK loop, same SAE and batch
    (on the GPU when there is one)."""
    from .plugins import create_dictionary
    from .train import Member, TrainConfig, Trainer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(batch, d_in, generator=g).to(device) for _ in range(steps)]
    ours_sae = create_dictionary("topk", d_in=d_in, d_sae=d_sae, site="resid_post.0", k=k).to(device)
    trainer = Trainer([Member(ours_sae)], TrainConfig(steps=10**9, lr=4e-4))

    W_enc = torch.nn.Parameter((torch.randn(d_in, d_sae) / d_in ** 0.5).to(device))
    W_dec = torch.nn.Parameter((torch.randn(d_sae, d_in) / d_in ** 0.5).to(device))
    b_enc, b_dec = (torch.nn.Parameter(torch.zeros(d_sae, device=device)),
                    torch.nn.Parameter(torch.zeros(d_in, device=device)))
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=4e-4)

    def baseline():
        for x in data:  # the textbook TopK loop
            pre = (x - b_dec) @ W_enc + b_enc
            v, i = pre.topk(k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
            loss = (f @ W_dec + b_dec - x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                W_dec.div_(W_dec.norm(dim=1, keepdim=True))

    def ours():
        for x in data:
            trainer.step({"resid_post.0": x}, stats=False)

    tb, to = _interleave(baseline, ours, rounds, warmup=1)
    n = steps * rounds
    result = {"what": f"train topk d_in={d_in} d_sae={d_sae} k={k} batch={batch}", "ratio": round(tb / to, 4),
              "ours": round(n / to, 2), "baseline": round(n / tb, 2),
              "unit": "steps/s (ratio: ours / baseline, higher is better)",
              "setup": _setup(device, steps=steps, rounds=rounds,
                              baseline="a plain TopK loop: encode, top-k, decode, MSE, Adam, renormalise")}
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
