"""The trainer: any iterator of activation batches in, trained dictionaries out.

It knows nothing of nnsight or models: a batch is a dict {site: tensor}. Several
dictionaries (different sites, types or widths) train in lockstep on one
stream. Adam with linear warm-up and a linear decay at the end, a sparsity
warm-up (L1 or k), unit-norm decoder rows by projection after every step, dead
features revived (auxiliary-k loss for top-k types, resampling otherwise),
activations normalised to mean norm sqrt(d_in) with the scale folded into the
weights at the end. Checkpoints are written atomically; a resumed run gives the
same weights as one never stopped.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import distributed
from .atomic import atomic_folder
from .dictionary import Dictionary
from .errors import NnsightSaeError


class TrainingError(NnsightSaeError):
    """Training cannot go on (NaN loss, a checkpoint that does not match)."""


@dataclass
class TrainConfig:
    """Optimisation settings shared by the dictionaries of one run."""

    steps: int
    lr: float = 4e-4
    warmup_steps: int = 100
    decay_start: float = 0.8  # fraction of steps after which the lr decays linearly to 0
    sparsity_warmup: float = 0.05  # fraction of steps over which L1 (or k) reaches its target
    dead_after_rows: int = 1_000_000  # a feature silent for this many rows counts as dead
    resample_every: int = 0  # steps between resamplings of dead features (0: a quarter of the run)
    checkpoint_every: int = 0  # steps between checkpoints (0: none)
    seed: int = 0
    adam_betas: tuple = (0.9, 0.999)
    # a backward over the active features only, where a type has one: None chooses per device by
    # measurement (`nnsight-sae bench train`): on the CPU it is faster; on CUDA the dense products
    # (tensor cores) were faster on an H100 (an earlier session's figure, not re-measured here)
    sparse_backward: bool | None = None


@dataclass
class Member:
    """One dictionary in a run: what it reads and predicts, and its input scales."""

    dictionary: Dictionary
    scale_in: float = 1.0
    scale_out: float = 1.0
    rows_since_fired: torch.Tensor | None = field(default=None, repr=False)

    @property
    def site(self) -> str:
        return self.dictionary.site

    @property
    def target_site(self) -> str:
        return self.dictionary.out_site or self.dictionary.site


def input_scale(rows: torch.Tensor) -> float:
    """The factor that brings rows to mean norm sqrt(d) (SAELens' expected-average normalisation)."""
    return float(math.sqrt(rows.shape[-1]) / rows.norm(dim=-1).mean().clamp_min(1e-8))


def fvu(target: torch.Tensor, recon: torch.Tensor) -> float:
    """Fraction of variance unexplained over a batch."""
    total = (target - target.mean(0)).pow(2).sum()
    return float((target - recon).pow(2).sum() / total.clamp_min(1e-12))


class Trainer:
    """Trains several dictionaries in lockstep; ``step(batch)`` is one optimiser step for each."""

    def __init__(self, members: list[Member], config: TrainConfig):
        self.members = members
        self.config = config
        self.step_count = 0
        self.optimizers, self.schedulers = [], []
        for m in members:
            params = [p for p in m.dictionary.parameters() if p.requires_grad]
            # fused: one kernel over all parameters (about 10 ms a step less than the for-loop on 2 CPU cores)
            opt = torch.optim.Adam(params, lr=config.lr, betas=config.adam_betas, fused=True)
            self.optimizers.append(opt)
            self.schedulers.append(torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor))
            m.rows_since_fired = torch.zeros(m.dictionary.d_sae, dtype=torch.long)

    # -- schedule ------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        """The learning rate at ``step`` over ``config.lr``: linear warm-up, then a linear
        decay to 0 from ``decay_start`` of the run."""
        c = self.config
        warm = min(1.0, (step + 1) / max(1, c.warmup_steps))
        decay_from = int(c.decay_start * c.steps)
        decay = 1.0 if step < decay_from else max(0.0, (c.steps - step) / max(1, c.steps - decay_from))
        return warm * decay

    def sparsity_scale_at(self, step: int) -> float:
        span = self.config.sparsity_warmup * self.config.steps
        return 1.0 if span < 1 else min(1.0, (step + 1) / span)

    # -- one step --------------------------------------------------------------
    def step(self, batch: dict[str, torch.Tensor], stats: bool = True) -> list[dict]:
        """One optimiser step of every dictionary; returns per-dictionary stats
        (loss, mse, l0, fvu, dead), or an empty list with stats=False."""
        step = self.step_count
        sparsity = self.sparsity_scale_at(step)
        results = []
        for m, opt, scheduler in zip(self.members, self.optimizers, self.schedulers):
            d = m.dictionary
            # one row per vector (head_out: one per head)
            x = batch[m.site].to(d.W_enc.device, d.W_enc.dtype).reshape(-1, d.d_in) * m.scale_in
            target = batch[m.target_site].to(d.W_enc.device, d.W_enc.dtype).reshape(-1, d.d_out) * m.scale_out
            if step == 0 and (d.b_dec_from_mean or m.target_site != m.site):
                with torch.no_grad():  # a transcoder's output bias, or a type's that asks, starts at the mean
                    mean = target.mean(0)
                    distributed.mean_([mean])
                    d.b_dec.copy_(mean)
            dead = m.rows_since_fired >= self.config.dead_after_rows
            sparse = self.config.sparse_backward
            out = d.training_loss(x, target, sparsity_scale=sparsity,
                                  dead=dead.to(x.device) if d.dead_features == "auxk" else None,
                                  sparse=x.device.type == "cpu" if sparse is None else sparse)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise TrainingError(f"loss is {loss.item()} at step {step} for the {d.type_name} dictionary "
                                    f"at {m.site}; the last good checkpoint is kept")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.mean_([p.grad for p in d.parameters() if p.grad is not None])
            opt.step()
            scheduler.step()
            d.normalize_decoder()
            with torch.no_grad():
                # values set outside the gradient (batchtopk's threshold) are averaged across processes
                distributed.mean_([p for p in d.parameters() if not p.requires_grad])
                m.rows_since_fired += len(x) * distributed.world()
                m.rows_since_fired[distributed.any_(out["fired"]).cpu()] = 0
                if d.dead_features == "resample" and self._resample_due(step):
                    self._resample(m, opt, x, target, out["recon"])
                if stats:
                    results.append({"loss": loss.item(), "mse": out["mse"].item(), "l0": float(out["l0"]),
                                    "fvu": fvu(target, out["recon"]), "dead": float(dead.float().mean())})
        self.step_count += 1
        return results

    def _resample_due(self, step: int) -> bool:
        every = self.config.resample_every or max(1, self.config.steps // 4)
        return step > 0 and step % every == 0 and step < 0.8 * self.config.steps

    def _resample(self, m: Member, opt, x, target, recon):
        dead = m.rows_since_fired >= self.config.dead_after_rows
        if not dead.any():
            return
        g = torch.Generator().manual_seed(self.config.seed * 7919 + self.step_count)
        errors = (target - recon).pow(2).sum(-1).cpu()
        m.dictionary.resample(dead.to(x.device), x, errors.to(x.device), g)
        m.dictionary.normalize_decoder()
        distributed.broadcast_([p.data for p in m.dictionary.parameters()])  # the first process's revived features
        for p in opt.param_groups[0]["params"]:  # forget the revived features' Adam moments
            state = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    _zero_feature_slices(state[key], dead, m.dictionary.d_sae)
        m.rows_since_fired[dead] = 0

    # -- checkpoints -------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (m, opt) in enumerate(zip(self.members, self.optimizers)):
            for k, v in m.dictionary.state_dict().items():
                out[f"{i}.param.{k}"] = v.detach().cpu().contiguous()
            out[f"{i}.rows_since_fired"] = m.rows_since_fired.clone()
            names = {id(p): n for n, p in m.dictionary.named_parameters()}
            for p, state in opt.state.items():
                for k, v in state.items():
                    out[f"{i}.adam.{names[id(p)]}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, (m, opt) in enumerate(zip(self.members, self.optimizers)):
            with torch.no_grad():
                for k, p in m.dictionary.state_dict(keep_vars=True).items():
                    p.copy_(tensors[f"{i}.param.{k}"])  # copy_ moves it to the parameter's device
            m.rows_since_fired = tensors[f"{i}.rows_since_fired"].clone()
            for name, p in m.dictionary.named_parameters():
                prefix = f"{i}.adam.{name}."
                # moments and (fused Adam) the step count go where the parameter is
                state = {k[len(prefix):]: v.clone().to(p.device) for k, v in tensors.items() if k.startswith(prefix)}
                if state:
                    opt.state[p] = state

    def _members_json(self) -> list[dict]:
        return json.loads(json.dumps([{"type": m.dictionary.type_name, "cfg": m.dictionary.cfg.as_dict(),
                                       "scale_in": m.scale_in, "scale_out": m.scale_out} for m in self.members]))

    def save_checkpoint(self, folder: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write the full training state atomically (safetensors + JSON, nothing pickled):
        weights, Adam's moments, the learning-rate schedulers' state, dead-feature counters."""
        with atomic_folder(folder) as tmp:
            save_file(self.state_tensors(), tmp / "state.safetensors")
            meta = {"step": self.step_count, "config": asdict(self.config), "members": self._members_json(),
                    "schedulers": [s.state_dict() for s in self.schedulers], **(extra or {})}
            (tmp / "state.json").write_text(json.dumps(meta, indent=2))
        return Path(folder)

    def load_checkpoint(self, folder: str | os.PathLike) -> dict:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "state.json").read_text())
            tensors = load_file(folder / "state.safetensors")
        except (OSError, ValueError) as e:
            raise TrainingError(f"cannot read checkpoint {folder}: {e}") from e
        if [{k: m[k] for k in ("type", "cfg")} for m in meta["members"]] != \
                [{k: m[k] for k in ("type", "cfg")} for m in self._members_json()]:
            raise TrainingError(f"checkpoint {folder} was written for other dictionaries")
        self.load_state_tensors(tensors)
        for opt, scheduler, state in zip(self.optimizers, self.schedulers, meta["schedulers"]):
            scheduler.load_state_dict(state)
            for group, lr in zip(opt.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
        self.step_count = meta["step"]
        return meta

    def finished(self) -> list[Dictionary]:
        """The dictionaries with the input scales folded in (for raw activations)."""
        for m in self.members:
            m.dictionary.fold_input_scale(m.scale_in, m.scale_out)
            m.scale_in = m.scale_out = 1.0
        return [m.dictionary for m in self.members]


def _zero_feature_slices(t: torch.Tensor, dead: torch.Tensor, d_sae: int) -> None:
    for dim, size in enumerate(t.shape):
        if size == d_sae:
            index = [slice(None)] * t.dim()
            index[dim] = dead.to(t.device)
            t[tuple(index)] = 0
            return


def train(trainer: Trainer, batches: Iterable[dict], *, checkpoint_dir=None, checkpoint_extra=None,
          progress: bool = True) -> list[dict]:
    """Run ``trainer`` over ``batches`` until ``config.steps``; returns the last stats.

    Writes a checkpoint every ``checkpoint_every`` steps, and one on Ctrl-C
    (in data-parallel runs, only the first process writes).
    """
    main = distributed.rank() == 0
    config = trainer.config
    bar = tqdm(total=config.steps, initial=trainer.step_count, desc="train", disable=not (progress and main),
               dynamic_ncols=True)
    stats: list[dict] = []
    try:
        for batch in batches:
            if trainer.step_count >= config.steps:
                break
            report = (trainer.step_count + 1) % 10 == 0 or trainer.step_count + 1 == config.steps
            step_stats = trainer.step(batch, stats=report)
            bar.update(1)
            if report:
                stats = step_stats
                s = stats[0]
                bar.set_postfix(loss=f"{s['loss']:.4f}", l0=f"{s['l0']:.1f}", fvu=f"{s['fvu']:.3f}",
                                dead=f"{s['dead']:.2f}")
            if main and checkpoint_dir and config.checkpoint_every and trainer.step_count % config.checkpoint_every == 0:
                trainer.save_checkpoint(checkpoint_dir, checkpoint_extra)
    except KeyboardInterrupt:
        if main and checkpoint_dir:
            trainer.save_checkpoint(checkpoint_dir, checkpoint_extra)
        raise
    finally:
        bar.close()
    if trainer.step_count < config.steps:
        raise TrainingError(f"the data ran out after {trainer.step_count} of {config.steps} steps")
    return stats
