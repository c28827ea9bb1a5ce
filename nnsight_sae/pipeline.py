"""Text in, trained and evaluated dictionaries out: the job behind `nnsight-sae train`."""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed
from .atomic import write_json
from .attach import site_device
from .corpus import check_source, contexts, embedded_choice, load_corpus
from .dictionary import Dictionary
from .errors import NnsightSaeError
from .evaluate import evaluate
from .files import save_dictionary
from .harvest import ActivationStore
from .models import cache_dir, model_id
from .plugins import registry
from .sites import resolve_site
from .train import Member, TrainConfig, Trainer, input_scale, train


@dataclass
class DataSpec:
    """Where the tokens come from and how they are cut."""

    corpus: str | None = None  # an embedded corpus (code, prose, mix); the default when no other source
    dataset: str | None = None
    data: str | None = None
    split: str = "train"
    text_column: str = "text"
    ctx_len: int = 128
    tokens: int = 300_000
    eval_tokens: int = 8_192
    drop_bos: bool = True  # leave out each context's first position (BOS or the attention sink)

    def __post_init__(self):
        check_source(self.corpus, self.dataset, self.data)

    def describe(self) -> dict:
        return {"corpus": embedded_choice(self.corpus, self.dataset, self.data), "dataset": self.dataset,
                "data": self.data, "split": self.split, "text_column": self.text_column, "ctx_len": self.ctx_len,
                "drop_bos": self.drop_bos}


@dataclass
class RunSpec:
    """What to train: one dictionary per (type, site, width) combination."""

    types: list[str]
    sites: list[str]
    d_sae: list[int]
    hyper: dict = field(default_factory=dict)  # type options (k, l1_coefficient, ...); each type takes its own
    epochs: int = 1
    batch_size: int = 256
    buffer_rows: int = 65_536
    harvest_batch: int = 8
    # further sites harvested with the dictionaries' own, so that several runs share one harvest
    harvest_sites: list[str] = field(default_factory=list)


def token_contexts(model, spec: DataSpec, *, held_out: bool) -> torch.Tensor:
    corpus = load_corpus(corpus=spec.corpus, dataset=spec.dataset, data=spec.data, split=spec.split,
                         text_column=spec.text_column, held_out=held_out)
    limit = getattr(model._module.config, "max_position_embeddings", None)
    n = spec.eval_tokens if held_out else spec.tokens
    return contexts(corpus, model.tokenizer, spec.ctx_len, n, max_positions=limit)


def type_options(cls, hyper: dict) -> dict:
    """The options in ``hyper`` that dictionary type ``cls`` declares."""
    declared = cls.config_class.declared()
    return {k: v for k, v in hyper.items() if k in declared}


def build_dictionaries(model, run: RunSpec) -> list[Dictionary]:
    """Fresh dictionaries for every (type, site, width), checked against the model, each
    on its site's device (so a GPU-placed layer's dictionary trains on that GPU). Each type
    takes the options of ``run.hyper`` it declares."""
    out = []
    for type_name in run.types:
        cls = registry().get("dictionary_types", type_name)
        for site_name in run.sites:
            site = resolve_site(model, site_name)
            if site.d_in is None:
                raise NnsightSaeError(f"cannot tell the width of raw site {site_name}")
            for d_sae in run.d_sae:
                d = cls({"d_in": site.d_in, "d_sae": d_sae, "site": site_name, "model": model_id(model),
                         **type_options(cls, run.hyper)})
                if d.out_site:
                    resolve_site(model, d.out_site)
                out.append(d.to(site_device(model, site)))
    return out


def activation_store(model, sites: list[str], spec: DataSpec, *, harvest_batch: int = 8,
                     progress: bool = True) -> ActivationStore:
    """Harvested training activations, cached by model, corpus and sites. In a
    data-parallel run each process harvests its own shard of the contexts."""
    tokens = token_contexts(model, spec, held_out=False)[distributed.rank()::distributed.world()]
    # the model's full path (not only model_id's folder name) and size tell two local models apart
    key = {"model": str(model._module.config.name_or_path), "n_params": sum(p.numel() for p in model._module.parameters()),
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
    rank, world = distributed.rank(), distributed.world()
    seed = config.get("seed", 0)
    dictionaries = build_dictionaries(model, run)
    for i, d in enumerate(dictionaries):  # each dictionary's start depends only on the seed and its index
        d.reset_parameters(seed=seed * 1000 + i)
    sites = sorted({s for d in dictionaries for s in (d.site, d.out_site) if s})
    store = activation_store(model, sorted(set(sites) | set(run.harvest_sites)), data,
                             harvest_batch=run.harvest_batch, progress=progress)
    t_harvest = time.perf_counter() - t0
    steps = sum(store.batches_per_epoch(run.batch_size, buffer_rows=run.buffer_rows, seed=seed, epoch=e)
                for e in range(run.epochs))
    steps = int(distributed.reduce_value(steps, "min"))  # every process takes the same steps
    # a feature counts as dead after a tenth of the run (at most 1M rows) without firing
    config = {"dead_after_rows": min(1_000_000, steps * run.batch_size // 10), **config}
    cfg = TrainConfig(steps=steps, **config)
    sample = torch.randperm(store.n_rows, generator=torch.Generator().manual_seed(seed))[:20_000].sort().values
    scales = {s: distributed.reduce_value(input_scale(store.rows(s, sample.numpy()).reshape(-1, store.shapes[s][-1])),
                                          "mean") for s in sites}
    members = [Member(d, scales[d.site], scales[d.out_site or d.site]) for d in dictionaries]
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
        distributed.state().wait_for_everyone()
        if rank != 0:
            return []
    folders = [out] if len(finished) == 1 else [out / f"{d.type_name}-{d.site}-{d.d_sae}" for d in finished]
    for d, folder in zip(finished, folders):
        d.cfg.training_tokens = store.n_rows
        save_dictionary(d, folder, model_name=model_id(model))
    eval_tokens = token_contexts(model, data, held_out=True)
    results = evaluate(model, finished, eval_tokens, drop_bos=data.drop_bos, progress=progress)
    t_eval = time.perf_counter() - t0 - t_harvest - t_train
    for r, folder in zip(results, folders):
        r["seconds"] = {"harvest": round(t_harvest, 1), "train": round(t_train, 1), "eval": round(t_eval, 1)}
        r["train_rows"], r["epochs"], r["steps"] = store.n_rows, run.epochs, steps
        write_json(folder / "eval.json", r)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return results
