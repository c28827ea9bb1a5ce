"""Hook specifications: what a plugin may register or answer. Specs only; no plugin logic.

Implement a hook with ``@nnsight_sae.hookimpl`` on a function of the same name in the
module your entry point names (group ``nnsight_sae``). Hooks are called with keyword
arguments only.

Two kinds of hook:

- *Registration* hooks take no arguments and return a list. Each entry carries a
  unique name (``type_name`` for dictionary types, ``name`` otherwise); two plugins
  registering one name is an error naming both. ``nnsight-sae info`` lists every entry
  with the plugin that registered it.
- *Answer* hooks (``firstresult=True``) take what the caller has and return an answer
  or None; the first plugin that answers wins (``@hookimpl(tryfirst=True)`` to go
  before the first-party plugins).
"""

import pluggy

hookspec = pluggy.HookspecMarker("nnsight_sae")
hookimpl = pluggy.HookimplMarker("nnsight_sae")


@hookspec
def nnsight_sae_dictionary_types():
    """Register dictionary types: a list of :class:`nnsight_sae.Dictionary` subclasses.

    Each sets ``type_name`` (the ``--type`` value), ``config_class`` (its options, an
    :class:`nnsight_sae.options.Options` subclass: ``nnsight-sae train`` takes every
    option not marked ``cli=False`` as a flag) and implements ``encode`` in plain torch.
    """


@hookspec
def nnsight_sae_analyses():
    """Register analyses: a list of :class:`nnsight_sae.Analysis` instances.

    Each has a ``name`` (the ``nnsight-sae analyze NAME`` value), a one-line ``help``,
    an ``Options`` class (its flags) and ``run(*, model, dictionary, out_dir, options)``
    returning the JSON result.
    """


@hookspec
def nnsight_sae_circuit_methods():
    """Register circuit methods: a list of :class:`nnsight_sae.CircuitMethod` instances.

    Each has a ``name`` (the ``nnsight-sae circuit --method`` value), a one-line ``help``,
    an ``Options`` class and one job: ``score_heads(model, task, prompts, *, train_index,
    seed, options, seconds, ablation)`` returns an (n_layers, n_heads) tensor of scores
    (``ablation``: how the run ablates heads, for methods that estimate its effects);
    ``options_for(options, ablation)`` may fill in settings whose default depends on it.
    """


@hookspec
def nnsight_sae_tasks():
    """Register named tasks for circuit discovery: a list of :class:`nnsight_sae.Task`
    instances, each with a ``name`` (the ``--task`` value)."""


@hookspec(firstresult=True)
def nnsight_sae_task_from_path(path):
    """Return a :class:`nnsight_sae.Task` reading the task file at ``path`` (a string,
    the ``--task`` value), or None if this plugin does not read such files."""


@hookspec
def nnsight_sae_architectures():
    """Register architecture maps: a list of :class:`nnsight_sae.ArchitectureMap` values.

    Each names the Hugging Face ``model_type`` strings it covers and the module paths
    that the named sites (``resid_pre``, ``resid_post``, ``attn_out``, ``head_out``,
    ``mlp_in``, ``mlp_out``) and the analyses (norms, value and output projections,
    embedding, unembedding) resolve to.
    """


@hookspec
def nnsight_sae_formats():
    """Register dictionary file formats: a list of :class:`nnsight_sae.files.Format` instances.

    Each has a ``name``, ``detect(path)`` (does this folder or file hold one?), ``read(path)``
    -> Dictionary, the ``hub_files`` a Hub download needs, and optionally ``write``.
    ``load_dictionary`` tries them in turn before our own (SAELens) layout.
    """
