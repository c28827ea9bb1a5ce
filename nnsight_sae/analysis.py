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


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically: a temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, data) -> Path:
    """Write JSON atomically."""
    return write_text(path, json.dumps(data, indent=2))


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure atomically (temp file, then rename) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        pyplot().close(fig)
    return path


def option_defaults(analysis: Analysis) -> dict:
    """The defaults of the options an analysis declares in ``add_arguments`` (by dest name),
    so the API and the CLI run it with the same settings."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    analysis.add_arguments(parser)
    return {a.dest: a.default for a in parser._actions if a.default is not argparse.SUPPRESS}


def run_analysis(name: str, *, model, dictionary, out_dir: str | os.PathLike, **options) -> dict:
    """Run a registered analysis and write its result to ``out_dir/NAME.json``; options
    not given take the defaults its CLI options declare."""
    from .plugins import registry

    analysis = registry().get("analyses", name)
    out_dir = Path(out_dir)
    options = {**option_defaults(analysis), **options}
    result = analysis.run(model=model, dictionary=dictionary, out_dir=out_dir, options=options)
    write_json(out_dir / f"{name}.json", result)
    return result
