"""Tasks for circuit discovery: the base class, the prompt sets tasks make, and finding a
task by name or by file. Tasks themselves come from plugins (``nnsight_sae_tasks``, and
``nnsight_sae_task_from_path`` for task files)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import NnsightSaeError
from .plugins import registry


class Task:
    """A task for circuit discovery: positive and negative prompts, answers and a metric.

    Subclasses set ``name`` and ``help`` and implement ``prompts(tokenizer, n, seed=0,
    split="train") -> TaskPrompts`` (split "train" or "heldout") and ``metric(last_logits,
    prompts) -> (n,)``. ``method_defaults`` maps a circuit method's name to option values
    this task recommends for it (a paper's per-task settings); the user's own win."""

    name = ""
    help = ""
    method_defaults: dict[str, dict] = {}

    def metric_is_linear(self, prompts: TaskPrompts) -> bool:
        """Whether ``metric`` is linear in the logits on these prompts: its gradient is then the same
        at any logits, and attribution skips the pass that would find them. False unless the task
        says so."""
        return False

    def metric_gradient(self, logits: torch.Tensor, prompts: TaskPrompts) -> torch.Tensor:
        """d sum(metric) / d last logits (n, vocab), computed outside any trace: the metric is any
        Python, which cannot run on NDIF."""
        with torch.enable_grad():
            logits = logits.detach().float().clone().requires_grad_()
            self.metric(logits, prompts).sum().backward()
        return logits.grad


class TaskError(NnsightSaeError):
    """A task file that cannot be read, or too few usable prompts."""


@dataclass
class TaskPrompts:
    """Prompts of one task, index-aligned: positive[i] is answered by answers[i]."""

    positive: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    wrong: list[int | None] = field(default_factory=list)
    extra: list[dict] = field(default_factory=list)  # per-prompt data a metric needs
    # the positive prompt with the answer changed (IOI: another indirect object), for feature patching;
    # None where a pair has none (or one of another token length)
    counterfactual: list[str | None] = field(default_factory=list)
    skipped: int = 0

    def add(self, tokenizer, positive: str, negative: str, answer: int | None, wrong: int | None = None,
            counterfactual: str | None = None) -> None:
        """Keep a pair if its answer is one token and both prompts have the same token
        length (patching needs aligned positions); otherwise count it as skipped. A
        counterfactual of another length is dropped (None), not the pair."""
        if answer is None or not _same_length(tokenizer, positive, negative):
            self.skipped += 1
            return
        self.positive.append(positive)
        self.negative.append(negative)
        self.answers.append(answer)
        self.wrong.append(wrong)
        aligned = counterfactual is not None and _same_length(tokenizer, positive, counterfactual)
        self.counterfactual.append(counterfactual if aligned else None)

    def __len__(self):
        return len(self.positive)

    def subset(self, index):
        pick = lambda xs: [xs[i] for i in index] if xs else xs  # noqa: E731
        return TaskPrompts(pick(self.positive), pick(self.negative), pick(self.answers), pick(self.wrong),
                           pick(self.extra), pick(self.counterfactual), self.skipped)


def single_token(tokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return ids[0] if len(ids) == 1 else None


def _same_length(tokenizer, a: str, b: str) -> bool:
    return len(tokenizer(a).input_ids) == len(tokenizer(b).input_ids)


def logit_difference(logits, prompts: TaskPrompts):
    """logit(answer) - logit(wrong) per prompt (log-prob of the answer where no wrong token)."""
    answers = torch.tensor(prompts.answers, device=logits.device)
    picked = logits.gather(-1, answers[:, None]).squeeze(-1)
    if _has_wrong(prompts):
        wrong = torch.tensor(prompts.wrong, device=logits.device)
        return picked - logits.gather(-1, wrong[:, None]).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _has_wrong(prompts: TaskPrompts) -> bool:
    return all(w is not None for w in prompts.wrong)


class LogitDifferenceTask(Task):
    """A task whose metric is ``logit_difference`` (linear in the logits where every prompt has a
    wrong token)."""

    def metric(self, logits, prompts: TaskPrompts):
        return logit_difference(logits, prompts)

    def metric_is_linear(self, prompts: TaskPrompts) -> bool:
        return _has_wrong(prompts)


def get_task(name: str) -> Task:
    """A registered task by name, or the task a plugin reads from the file at ``name``."""
    reg = registry()
    if name in reg.tasks:
        return reg.tasks[name].obj
    task = reg.pm.hook.nnsight_sae_task_from_path(path=str(name))
    if task is None:
        known = ", ".join(sorted(reg.tasks)) or "none"
        hint = "no such file" if not Path(name).exists() else "no plugin reads this file"
        raise TaskError(f"unknown task {name!r} ({hint}); tasks: {known}, or a task file (.jsonl)")
    return task
