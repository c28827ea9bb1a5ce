"""Analyses of a dictionary on a model (``nnsight-sae analyze NAME``): the base class a
plugin subclasses, and running one by name."""

from __future__ import annotations

import os
from pathlib import Path

from .atomic import write_json
from .errors import OptionError
from .options import NoOptions, Options
from .plugins import registry


class Analysis:
    """An analysis of a dictionary on a model.

    Subclasses set ``name`` and ``help``, declare their settings in ``Options`` (an
    :class:`nnsight_sae.options.Options` subclass: the CLI flags, their help, the API's
    defaults and the checks all come from it) and do the work in ``run``, which
    returns a JSON-able dict and may write pictures or pages into ``out_dir``. An analysis
    of several dictionaries at once sets ``many_dictionaries = True``: its ``run`` gets a
    list as ``dictionary`` (``--dicts A,B,...`` on the command line).
    """

    name = ""
    help = ""
    Options = NoOptions
    many_dictionaries = False

    def run(self, *, model, dictionary, out_dir: Path, options: Options) -> dict:
        raise NotImplementedError

    def options(self, **values) -> Options:
        """Checked options from keyword values (unset ones take their defaults)."""
        try:
            return self.Options(**values)
        except OptionError as e:
            raise OptionError(f"analysis {self.name!r}: {e}") from None


def run_analysis(name: str, *, model, dictionary, out_dir: str | os.PathLike, **options) -> dict:
    """Run a registered analysis and write its result to ``out_dir/NAME.json``; options
    not given take their declared defaults (bad ones raise :class:`OptionError`).
    ``dictionary`` is one dictionary, or a list of them for an analysis of several."""
    analysis = registry().get("analyses", name)
    checked = analysis.options(**options)
    if isinstance(dictionary, (list, tuple)) != analysis.many_dictionaries:
        if not analysis.many_dictionaries:
            raise OptionError(f"analysis {name!r} takes one dictionary, not a list")
        dictionary = [dictionary]
    out_dir = Path(out_dir)
    result = analysis.run(model=model, dictionary=dictionary, out_dir=out_dir, options=checked)
    write_json(out_dir / f"{name}.json", result)
    return result
