"""Base classes for what plugins register besides dictionary types and
architectures: analyses (``nnsight-sae analyze NAME``) and tasks (``--task``)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


class Analysis:
    """An analysis of a dictionary on a model.

    Subclasses set ``name`` and ``help``, declare CLI options in
    ``add_arguments`` and do the work in ``run``, which returns a JSON-able dict
    and may write pictures or pages into ``out_dir``.
    """

    name = ""
    help = ""

    def add_arguments(self, parser) -> None:
        """Add this analysis' options to an argparse parser."""

    def run(self, *, model, dictionary, out_dir: Path, options: dict) -> dict:
        raise NotImplementedError


class Task:
    """A task for circuit discovery: positive and negative prompts, answers and
    a metric. Subclasses set ``name`` and ``help`` and implement
    ``prompts(tokenizer, n, seed=0, split="train")`` (split "train" or "heldout")
    and ``metric(last_logits, prompts)``; see ``nnsight_sae.circuits``."""

    name = ""
    help = ""


def write_json(path: str | os.PathLike, data) -> Path:
    """Write JSON atomically: a temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def run_analysis(name: str, *, model, dictionary, out_dir: str | os.PathLike, **options) -> dict:
    """Run a registered analysis and write its result to ``out_dir/NAME.json``."""
    from .plugins import registry

    analysis = registry().get("analyses", name)
    out_dir = Path(out_dir)
    result = analysis.run(model=model, dictionary=dictionary, out_dir=out_dir, options=options)
    write_json(out_dir / f"{name}.json", result)
    return result
