"""Hook specifications: what a plugin may register. Specs only; no plugin logic.

Every hook takes no arguments and returns a list (or None). Hooks are called with
keyword arguments only. Each returned object carries a unique ``name``; two
plugins returning the same name for the same hook is an error naming both.
"""

import pluggy

hookspec = pluggy.HookspecMarker("nnsight_sae")
hookimpl = pluggy.HookimplMarker("nnsight_sae")


@hookspec
def nnsight_sae_dictionary_types():
    """Register dictionary types.

    Returns a list of :class:`nnsight_sae.Dictionary` subclasses. Each class has a
    ``type_name`` (the ``--type`` value and the ``architecture`` field of
    ``cfg.json``), implements ``encode``/``decode`` in plain torch, and accepts its
    config dict in ``__init__``.
    """


@hookspec
def nnsight_sae_analyses():
    """Register analyses.

    Returns a list of :class:`nnsight_sae.Analysis` instances. Each has a ``name``
    (the ``nnsight-sae analyze NAME`` value), a one-line ``help``,
    ``add_arguments(parser)`` for its CLI options and
    ``run(*, model, dictionary, out_dir, options) -> dict`` returning the JSON result.
    """


@hookspec
def nnsight_sae_tasks():
    """Register tasks (prompt sets with a metric) for circuit discovery.

    Returns a list of :class:`nnsight_sae.Task` instances, each with a ``name``
    (the ``--task`` value).
    """


@hookspec
def nnsight_sae_architectures():
    """Register architecture maps.

    Returns a list of :class:`nnsight_sae.ArchitectureMap` values. Each names the
    Hugging Face ``model_type`` strings it covers and the module paths that the
    named sites (``resid_pre``, ``resid_post``, ``attn_out``, ``head_out``,
    ``mlp_in``, ``mlp_out``) resolve to.
    """
