"""First-party tasks for circuit discovery: ioi, greater-than, docstring, and JSONL files.

A task makes positive prompts (the model can do the task), negative prompts of
the same form with the task signal destroyed, the answer token of each, and a
metric on the last-position logits.

The built-in tasks have two prompt sets: ``split="train"`` and ``split="heldout"``,
which share no names, templates, places, objects, events, centuries or argument
names, so a circuit found on one can be checked on prompts it has never seen.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from nnsight_sae.tasks import LogitDifferenceTask, Task, TaskError, TaskPrompts, single_token

SPLITS = ("train", "heldout")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise TaskError(f"unknown prompt split {split!r}; splits: {', '.join(SPLITS)}")


# Each list is a train part and a held-out part that share nothing.
NAMES = {
    "train": ["Mary", "John", "Tom", "James", "Anna", "Paul", "Kate", "Mark", "Sarah", "David", "Lucy", "Peter",
              "Emma", "Jack", "Alice", "Michael", "Laura", "Daniel", "Rachel", "Steve", "Susan", "George", "Linda",
              "Frank", "Helen", "Robert", "Karen", "Brian", "Julia", "Adam", "Amy", "Chris", "Jane", "Mike", "Ben"],
    "heldout": ["Oliver", "Sophie", "Henry", "Grace", "Lily", "Sam", "Max", "Nina", "Leo", "Ruth", "Carl", "Ella",
                "Fred", "Rose", "Tim", "Jill", "Ryan", "Kevin", "Tony", "Alex", "Lisa", "Harry", "Luke", "Eric"],
}
PLACES = {
    "train": ["store", "park", "school", "hospital", "station", "library", "beach", "office", "market", "garden",
              "restaurant", "museum", "bank", "church", "cinema"],
    "heldout": ["airport", "hotel", "theatre", "kitchen", "farm", "zoo", "gym", "bakery", "harbor"],
}
OBJECTS = {
    "train": ["drink", "book", "ball", "gift", "letter", "key", "ring", "bag", "pen", "cake", "flower", "hat"],
    "heldout": ["card", "box", "cup", "watch", "map", "coin", "shirt", "lamp", "toy", "note"],
}
# ABBA: A B ... B ... -> A.  BABA: B A ... B ... -> A.  ({a}=IO, {b}=S; the placeholders are swapped for BABA)
IOI_TEMPLATES = {
    "train": [
        "When {a} and {b} went to the {place}, {b} gave a {object} to",
        "When {a} and {b} got a {object} at the {place}, {b} decided to give it to",
        "After {a} and {b} went to the {place}, {b} gave a {object} to",
        "While {a} and {b} were working at the {place}, {b} gave a {object} to",
        "Then, {a} and {b} went to the {place}. {b} gave a {object} to",
        "Then, {a} and {b} had a long argument, and afterwards {b} said to",
        "When {a} and {b} arrived at the {place}, {b} handed a {object} to",
        "After the lunch, {a} and {b} went to the {place}. {b} gave a {object} to",
        "Friends {a} and {b} found a {object} at the {place}. {b} gave it to",
        "The {place} was quiet when {a} and {b} arrived, so {b} passed a {object} to",
        "{a} and {b} were at the {place}. Later, {b} threw a {object} to",
        "On Monday {a} and {b} visited the {place}, and {b} showed a {object} to",
        "As {a} and {b} left the {place}, {b} offered a {object} to",
        "Yesterday {a} and {b} met at the {place}, where {b} sold a {object} to",
        "At the {place}, {a} and {b} had fun. Then {b} brought a {object} to",
        "Before {a} and {b} went to the {place}, {b} lent a {object} to",
    ],
    "heldout": [
        "Once {a} and {b} reached the {place}, {b} mailed a {object} to",
        "Last week {a} and {b} cleaned the {place}, and {b} returned a {object} to",
        "Since {a} and {b} were tired at the {place}, {b} tossed a {object} to",
        "During the trip, {a} and {b} stopped at the {place}. {b} sent a {object} to",
        "{a} and {b} waited at the {place} for hours. Finally {b} gave a {object} to",
        "In the morning {a} and {b} walked to the {place}, and {b} read a {object} to",
        "When the rain started, {a} and {b} ran into the {place}. {b} handed a {object} to",
        "Because {a} and {b} worked late at the {place}, {b} left a {object} for",
    ],
}


class IOITask(LogitDifferenceTask):
    """Indirect object identification: "When Mary and John went to the store, John gave a drink to" ->
    " Mary". Negatives name three distinct people (no repeated subject); counterfactuals name
    another indirect object ("When Lucy and John ..."). Metric: logit(IO) - logit(S)."""

    name = "ioi"
    help = "indirect object identification (ABBA/BABA templates); metric logit(IO) - logit(S)"

    def prompts(self, tokenizer, n: int, seed: int = 0, split: str = "train") -> TaskPrompts:
        _check_split(split)
        rng = random.Random(seed)
        names = [x for x in NAMES[split] if single_token(tokenizer, " " + x) is not None]
        templates = IOI_TEMPLATES[split]
        out = TaskPrompts()
        for i in range(n):
            template = templates[i % len(templates)]
            baba = (i // len(templates)) % 2 == 1
            io, s, c = rng.sample(names, 3)
            place, obj = rng.choice(PLACES[split]), rng.choice(OBJECTS[split])
            p = _fill(template, first=(s if baba else io), second=(io if baba else s), repeat=s,
                      place=place, obj=obj)
            q = _fill(template, first=(s if baba else io), second=(io if baba else s), repeat=c,
                      place=place, obj=obj)
            cf = _fill(template, first=(s if baba else c), second=(c if baba else s), repeat=s,
                       place=place, obj=obj)
            out.add(tokenizer, p, q, single_token(tokenizer, " " + io), single_token(tokenizer, " " + s), cf)
        return out


def _fill(template, *, first, second, repeat, place, obj):
    """Fill {a} (first name), the first {b} (second name) and the second {b} (the repeated name)."""
    text = template.replace("{a}", first)
    head, _, tail = text.partition("{b}")
    text = head + second + tail.replace("{b}", repeat)
    return text.replace("{place}", place).replace("{object}", obj)


EVENTS = {
    "train": ["war", "expedition", "famine", "reign", "drought", "strike", "siege", "voyage", "crisis", "revolt",
              "pandemic", "campaign", "construction", "occupation", "festival", "embargo"],
    "heldout": ["blockade", "dynasty", "journey", "rebellion", "boom", "truce", "exile", "migration", "mission"],
}
CENTURIES = {"train": (11, 12, 13, 14, 16, 17, 19), "heldout": (15, 18)}


class GreaterThanTask(Task):
    """"The war lasted from the year 1732 to the year 17" -> a tens digit greater than 3.

    SmolLM2-style tokenizers split years into digits, so the answer is the next
    digit. Metric: probability on digits greater than the start year's tens digit
    minus probability on smaller ones. Negatives start at year XX01 (every
    continuation counts as greater, so the comparison carries no signal); they are
    also the counterfactuals for feature patching."""

    name = "greater-than"
    help = "years: P(tens digit > start) - P(< start); negatives start at XX01"

    def prompts(self, tokenizer, n: int, seed: int = 0, split: str = "train") -> TaskPrompts:
        _check_split(split)
        rng = random.Random(seed)
        digits = [single_token(tokenizer, str(d)) for d in range(10)]
        if any(d is None for d in digits):
            raise TaskError("greater-than needs a tokenizer with single-token digits")
        pos, neg, ans, wrong, extra = [], [], [], [], []
        for i in range(n):
            event, century = rng.choice(EVENTS[split]), rng.choice(CENTURIES[split])
            tens = rng.randint(2, 8)
            year = century * 100 + tens * 10 + rng.randint(0, 9)
            p = f"The {event} lasted from the year {year} to the year {century}"
            q = f"The {event} lasted from the year {century}01 to the year {century}"
            pos.append(p)
            neg.append(q)
            ans.append(digits[min(9, tens + 1)])
            wrong.append(None)
            extra.append({"tens": tens, "digits": digits})
        return TaskPrompts(pos, neg, ans, wrong, extra, counterfactual=list(neg))

    def metric(self, logits, prompts: TaskPrompts):
        digits = torch.tensor(prompts.extra[0]["digits"], device=logits.device)
        probs = torch.softmax(logits.float(), dim=-1)[:, digits]  # (n, 10)
        tens = torch.tensor([e["tens"] for e in prompts.extra], device=logits.device)
        d = torch.arange(10, device=logits.device)
        greater = (d[None] > tens[:, None]).float()
        less = (d[None] < tens[:, None]).float()
        return (probs * greater).sum(-1) - (probs * less).sum(-1)


ARG_NAMES = {
    "train": ["path", "mode", "size", "name", "value", "key", "data", "count", "index", "items", "text", "limit",
              "start", "end", "step", "width", "height", "color", "label", "target", "source", "level", "timeout"],
    "heldout": ["buffer", "flag", "format", "prefix", "suffix", "offset", "depth", "weight", "scope", "query",
                "token", "delay", "encoding", "parent", "child", "order", "result", "config", "port", "user"],
}
FUNC_NAMES = {"train": ["load", "save", "parse", "render", "update", "compute", "merge", "scale", "split", "fetch"],
              "heldout": ["encode", "resolve", "validate", "convert", "send", "build", "filter"]}
SUMMARIES = {"train": ["Run the operation."], "heldout": ["Apply the change.", "Handle one request."]}


class DocstringTask(LogitDifferenceTask):
    """A function whose docstring lists ``:param`` lines; the answer is the next
    argument's name. Negatives replace the names in the signature and docstring
    by other random ones, so the docstring no longer follows the signature."""

    name = "docstring"
    help = "next :param name in a docstring; negatives scramble argument names"
    # O'Neill & Bui's shared SAE used a larger L1 on docstring (0.05; 0.02 on the others)
    method_defaults = {"code-overlap": {"l1": 0.05}, "code-overlap-edges": {"l1": 0.05}}

    def prompts(self, tokenizer, n: int, seed: int = 0, split: str = "train") -> TaskPrompts:
        _check_split(split)
        rng = random.Random(seed)
        names = [a for a in ARG_NAMES[split] if single_token(tokenizer, " " + a) is not None]
        out = TaskPrompts()
        for _ in range(n):
            fn, summary = rng.choice(FUNC_NAMES[split]), rng.choice(SUMMARIES[split])
            args = rng.sample(names, 6)
            a, b, c = args[:3]
            p = self._text(fn, summary, (a, b, c), (a, b))
            x, y, z, w = args[3:] + [rng.choice([v for v in names if v not in args])]
            q = self._text(fn, summary, (x, y, c), (z, w))
            out.add(tokenizer, p, q, single_token(tokenizer, " " + c), single_token(tokenizer, " " + a))
        return out

    @staticmethod
    def _text(fn, summary, signature, documented):
        lines = [f"def {fn}(self, {', '.join(signature)}):", f'    """{summary}', ""]
        lines += [f"    :param {arg}: the {arg}" for arg in documented]
        return "\n".join(lines) + "\n    :param"


class FileTask(LogitDifferenceTask):
    """Any JSONL task file: one object per line with prompt, answer, negative,
    negative_answer and optional wrong and counterfactual (for feature patching; on
    every line or none). Metric: logit(answer) - logit(wrong) where wrong is given,
    else log p(answer)."""

    name = "file"
    help = "a JSONL task file (prompt, answer, negative, negative_answer, wrong?)"

    def __init__(self, path):
        self.path = path

    @classmethod
    def open(cls, path: str):
        """The task in the file at ``path`` if it is a .jsonl file (None otherwise)."""
        if not path.endswith(".jsonl"):
            return None
        if not Path(path).is_file():
            raise TaskError(f"no such task file: {path}")
        return cls(path)

    def prompts(self, tokenizer, n: int | None = None, seed: int = 0, split: str = "train") -> TaskPrompts:
        if split != "train":
            raise TaskError("a task file is one prompt set; for held-out prompts pass another file")
        try:
            rows = [json.loads(line) for line in Path(self.path).read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as e:
            raise TaskError(f"cannot read task file {self.path}: {e}") from None
        prompts = TaskPrompts()
        for i, row in enumerate(rows):
            missing = {"prompt", "answer", "negative"} - set(row)
            if missing:
                raise TaskError(f"{self.path} line {i + 1}: missing {', '.join(sorted(missing))}")
            answer = single_token(tokenizer, row["answer"])
            wrong = single_token(tokenizer, row["wrong"]) if row.get("wrong") else None
            if row.get("wrong") and wrong is None:
                answer = None  # a multi-token "wrong" makes the pair unusable too
            if ("counterfactual" in row) != ("counterfactual" in rows[0]):
                raise TaskError(f"{self.path} line {i + 1}: give a counterfactual on every line or on none")
            prompts.add(tokenizer, row["prompt"], row["negative"], answer, wrong, row.get("counterfactual"))
        if len(prompts) < 2:
            raise TaskError(f"{self.path}: only {len(prompts)} usable prompts ({prompts.skipped} skipped: answers "
                            f"must be one token, prompt and negative the same token length)")
        return prompts.subset(range(min(n, len(prompts)))) if n else prompts
