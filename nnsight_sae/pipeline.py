"""Text in, trained and evaluated dictionaries out: the job behind `nnsight-sae train`."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .analysis import write_json
from .attach import site_device
from .corpus import contexts, load_corpus
from .dictionary import Dictionary
from .errors import NnsightSaeError
from .evaluate import evaluate
from .files import save_dictionary
from .harvest import ActivationStore
from .models import cache_dir
from .plugins import registry
from .sites import resolve_site, site_layer
from .train import Member, TrainConfig, Trainer, input_scale, train


@dataclass
class DataSpec:
    """Where the tokens come from and how they are cut."""

    dataset: str | None = None
    data: str | None = None
    split: str = "train"
    text_column: str = "text"
    ctx_len: int = 128
    tokens: int = 300_000
    eval_tokens: int = 8_192
    drop_bos: bool = True  # leave out each context's first position (BOS or the attention sink)

    def describe(self) -> dict:
        return {"dataset": self.dataset, "data": self.data, "split": self.split, "text_column": self.text_column,
                "ctx_len": self.ctx_len, "drop_bos": self.drop_bos}


@dataclass
class RunSpec:
    """What to train: one dictionary per (type, site, width) combination."""

    types: list[str]
    sites: list[str]
    d_sae: list[int]
    hyper: dict = field(default_factory=dict)  # k, l1_coefficient, tied, skip, ...
    epochs: int = 1
    batch_size: int = 256
    buffer_rows: int = 65_536
    harvest_batch: int = 8


def model_name(model) -> str:
    return str(getattr(model._module.config, "name_or_path", "") or type(model._module).__name__)


def token_contexts(model, spec: DataSpec, *, held_out: bool) -> torch.Tensor:
    corpus = load_corpus(dataset=spec.dataset, data=spec.data, split=spec.split,
                         text_column=spec.text_column, held_out=held_out)
    limit = getattr(model._module.config, "max_position_embeddings", None)
    n = spec.eval_tokens if held_out else spec.tokens
    return contexts(corpus, model.tokenizer, spec.ctx_len, n, max_positions=limit)


def build_dictionaries(model, run: RunSpec) -> list[Dictionary]:
    """Fresh dictionaries for every (type, site, width), checked against the model, each
    on its site's device (so a GPU-placed layer's dictionary trains on that GPU)."""
    out = []
    for type_name in run.types:
        cls = registry().get("dictionary_types", type_name)
        for site_name in run.sites:
            site = resolve_site(model, site_name)
            for d_sae in run.d_sae:
                cfg = {"d_in": site.d_in, "d_sae": d_sae, "site": site_name, "model": model_name(model),
                       **{k: v for k, v in run.hyper.items() if k in cls.defaults}}
                if type_name == "transcoder":
                    layer = site_layer(site_name)
                    if not site_name.startswith("mlp_in.") and "out_site" not in run.hyper:
                        raise NnsightSaeError(f"a transcoder reads mlp_in.L; got --site {site_name}")
                    cfg["out_site"] = run.hyper.get("out_site", f"mlp_out.{layer}")
                if site.d_in is None:
                    raise NnsightSaeError(f"cannot tell the width of raw site {site_name}")
                out.append(cls(cfg).to(site_device(model, site)))
    return out


def init_distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by accelerate/torchrun."""
    dist = torch.distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def end_distributed() -> None:
    """Leave the process group once every process is done (the first one saves and
    evaluates after the others have stopped training). A process that exits while
    its group is still up can abort in gloo's teardown."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _reduce(value: float, op) -> float:
    if not torch.distributed.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=op)
    return float(t[0])


def activation_store(model, sites: list[str], spec: DataSpec, *, harvest_batch: int = 8,
                     progress: bool = True) -> ActivationStore:
    """Harvested training activations, cached by model, corpus and sites. In a
    data-parallel run each process harvests its own shard of the contexts."""
    rank, world = init_distributed()
    tokens = token_contexts(model, spec, held_out=False)[rank::world]
    key = {"model": model_name(model), "n_params": sum(p.numel() for p in model._module.parameters()),
           **spec.describe()}
    return ActivationStore.cached(model, sites, tokens, cache_root=cache_dir() / "activations", key_info=key,
                                  batch_size=harvest_batch, drop_bos=spec.drop_bos, progress=progress)


def epoch_batches(store: ActivationStore, run: RunSpec, seed: int, start_step: int = 0, sites=None):
    """Batches for all epochs in a fixed order, starting at global step ``start_step``."""
    for epoch in range(run.epochs):
        n = store.batches_per_epoch(run.batch_size, buffer_rows=run.buffer_rows, seed=seed, epoch=epoch)
        if start_step >= n:
            start_step -= n
            continue
        yield from store.batches(run.batch_size, buffer_rows=run.buffer_rows, seed=seed, epoch=epoch,
                                 start=start_step, sites=sites)
        start_step = 0


def train_and_evaluate(model, data: DataSpec, run: RunSpec, config: dict, out: str | Path, *,
                       resume: bool = False, progress: bool = True) -> list[dict]:
    """Harvest, train every requested dictionary in lockstep, save, evaluate.

    Writes one folder per dictionary under ``out`` (``out`` itself when there
    is just one), each with cfg.json, sae_weights.safetensors and eval.json,
    plus ``out/checkpoint`` during training. Returns the eval results.
    """
    out = Path(out)
    t0 = time.perf_counter()
    rank, world = init_distributed()
    seed = config.get("seed", 0)
    dictionaries = build_dictionaries(model, run)
    for i, d in enumerate(dictionaries):  # each dictionary's start depends only on the seed and its index
        d.reset_parameters(seed=seed * 1000 + i)
    sites = sorted({s for d in dictionaries for s in (d.site, d.cfg.get("out_site")) if s})
    store = activation_store(model, sites, data, harvest_batch=run.harvest_batch, progress=progress)
    t_harvest = time.perf_counter() - t0
    steps = sum(store.batches_per_epoch(run.batch_size, buffer_rows=run.buffer_rows, seed=seed, epoch=e)
                for e in range(run.epochs))
    steps = int(_reduce(steps, torch.distributed.ReduceOp.MIN))  # every process takes the same steps
    # a feature counts as dead after a tenth of the run (at most 1M rows) without firing
    config = {"dead_after_rows": min(1_000_000, steps * run.batch_size // 10), **config}
    cfg = TrainConfig(steps=steps, **config)
    sample = torch.randperm(store.n_rows, generator=torch.Generator().manual_seed(seed))[:20_000].sort().values
    scales = {s: _reduce(input_scale(store.rows(s, sample.numpy()).reshape(-1, store.shapes[s][-1])),
                         torch.distributed.ReduceOp.SUM) / world for s in sites}
    members = [Member(d, scales[d.site], scales[d.cfg.get("out_site", d.site)]) for d in dictionaries]
    trainer = Trainer(members, cfg)
    checkpoint = out / "checkpoint"
    if resume:
        if not (checkpoint / "state.json").exists():
            raise NnsightSaeError(f"--resume: no checkpoint in {checkpoint}")
        trainer.load_checkpoint(checkpoint)
    batches = epoch_batches(store, run, seed, trainer.step_count, sites)
    train(trainer, batches, checkpoint_dir=checkpoint, progress=progress)
    t_train = time.perf_counter() - t0 - t_harvest
    finished = trainer.finished()
    if world > 1:
        for d in finished:  # each process shows what it ended with; they must agree
            digest = hashlib.sha256(b"".join(v.detach().cpu().numpy().tobytes()
                                             for v in d.state_dict().values())).hexdigest()[:16]
            print(f"rank {rank}: {d.type_name} at {d.site} weights sha256 {digest}", file=sys.stderr, flush=True)
        torch.distributed.barrier()
        if rank != 0:
            return []
    folders = [out] if len(finished) == 1 else [out / f"{d.type_name}-{d.site}-{d.d_sae}" for d in finished]
    for d, folder in zip(finished, folders):
        d.cfg["training_tokens"] = store.n_rows
        save_dictionary(d, folder, model_name=model_name(model))
    eval_tokens = token_contexts(model, data, held_out=True)
    results = evaluate(model, finished, eval_tokens, drop_bos=data.drop_bos, progress=progress)
    t_eval = time.perf_counter() - t0 - t_harvest - t_train
    for r, folder in zip(results, folders):
        r["seconds"] = {"harvest": round(t_harvest, 1), "train": round(t_train, 1), "eval": round(t_eval, 1)}
        r["train_rows"], r["epochs"], r["steps"] = store.n_rows, run.epochs, steps
        write_json(folder / "eval.json", r)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return results
