"""The ``nnsight-sae`` command line. Bad input: one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import NnsightSaeError, PluginError
from .options import REQUIRED, Option, Options


def cmd_info(args) -> int:
    from .files import SAELENS
    from .plugins import registry

    info = registry().to_json()
    # our own layout is the core's, listed beside the plugins' formats
    info["formats"] = {SAELENS.name: {"plugin": "core", "help": SAELENS.help, "library": SAELENS.library,
                                      "writes": True}, **info["formats"]}
    print(json.dumps(info, indent=2))
    return 0


def cmd_pull(args) -> int:
    from .files import fetch, format_of, save_dictionary

    _fail_if_exists(args.out)
    path = fetch(args.repo, args.path)
    fmt = format_of(path)
    d = fmt.read(path)
    save_dictionary(d, args.out)
    print(f"{args.repo}{'/' + args.path if args.path else ''}: a {fmt.name} {d.type_name} dictionary at {d.site} "
          f"(d_in {d.d_in}, d_sae {d.d_sae}); wrote {args.out} in our layout")
    return 0


def cmd_convert(args) -> int:
    from .files import SAELENS, format_of, formats

    writers = {f.name: f for f in formats() if f.writes}
    if args.to not in writers:
        raise NnsightSaeError(f"--to {args.to!r}: the layouts nnsight-sae writes are {', '.join(sorted(writers))}")
    _fail_if_exists(args.out)
    source = Path(args.src)
    fmt = format_of(source)
    d = fmt.read(source)
    writers[args.to].write(d, Path(args.out))
    print(f"{args.src} ({fmt.name}, {d.type_name} at {d.site}) -> {args.out} ({args.to})")
    return 0


def cmd_analyze(args) -> int:
    from .analysis import run_analysis
    from .files import load_dictionary
    from .plugins import registry

    analysis = registry().get("analyses", args.analysis)
    options = analysis.options(**given(args, analysis.Options))  # checked before anything loads
    dictionary = [load_dictionary(d) for d in args.dict] if analysis.many_dictionaries else load_dictionary(args.dict)
    model = _load_model(args)
    run_analysis(args.analysis, model=model, dictionary=dictionary, out_dir=args.out, **options.as_dict())
    print(f"wrote {args.out}/{args.analysis}.json")
    return 0


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default in --help, except where there is none."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _csv(kind):
    def parse(text):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    return parse


def _flags(name: str, option: Option) -> list[str]:
    return [f"--{name.replace('_', '-')}", *option.flags]


def _add_option(parser, name: str, option: Option, *, default, required: bool, help: str) -> None:
    kw = {"dest": name, "default": default, "help": help}
    if option.kind is bool and not option.many:
        kw["action"] = argparse.BooleanOptionalAction
    else:
        kw["type"] = _csv(option.kind) if option.many and not option.repeat else option.kind
        kw.update(required=required, metavar=option.metavar, choices=option.choices)
        if option.repeat:
            kw["action"] = "append"
    try:
        parser.add_argument(*_flags(name, option), **kw)
    except argparse.ArgumentError as e:
        raise PluginError(f"option {name!r} clashes with a flag nnsight-sae already has: {e}") from None


def add_options(parser, options: type[Options]) -> None:
    """Flags for every command-line option an Options class declares, with its defaults."""
    for name, option in options.declared().items():
        if option.cli:
            default = None if option.required or option.repeat else option.default
            _add_option(parser, name, option, default=default, required=option.required, help=option.help)


def add_merged_options(parser, owners: dict[str, type[Options]]) -> None:
    """Flags for the options of several owners (dictionary types, circuit methods) in one
    parser: each flag once, its help saying whose it is and each owner's default. Unset
    flags are None, so each owner keeps its own default."""
    merged: dict[str, list] = {}
    for owner, options in sorted(owners.items()):
        for name, option in options.declared().items():
            if option.cli:
                merged.setdefault(name, []).append((owner, option))
    for name, uses in merged.items():
        first_owner, first = uses[0]
        for owner, option in uses[1:]:
            if (option.kind, option.many) != (first.kind, first.many):
                raise PluginError(f"option {name!r} means different things to {first_owner!r} and {owner!r}")
        defaults = "; ".join(f"{owner}: {option.default!r}" for owner, option in uses if option.default not in (None, REQUIRED))
        flags = list(dict.fromkeys(f for _, option in uses for f in option.flags))
        union = Option(first.kind, None, first.help, many=first.many, repeat=first.repeat, flags=flags,
                       metavar=first.metavar, choices=first.choices)
        _add_option(parser, name, union, default=None, required=False,
                    help=f"{first.help} ({defaults or 'for ' + ', '.join(o for o, _ in uses)})")


def given(args, options: type[Options]) -> dict:
    """The values of an Options class' flags that were set on the command line."""
    return {name: getattr(args, name) for name, option in options.declared().items()
            if option.cli and getattr(args, name, None) is not None}


def _only_for(args, owners: dict[str, type[Options]], chosen: list[str], what: str) -> dict:
    """The merged flags that were set, each checked to be an option of a chosen owner."""
    values = {}
    for owner, options in owners.items():
        values.update(given(args, options))
    for name in values:
        if not any(name in owners[c].declared() for c in chosen):
            takers = ", ".join(sorted(o for o, options in owners.items() if name in options.declared()))
            raise NnsightSaeError(f"--{name.replace('_', '-')} is not an option of {what} {', '.join(chosen)} "
                                  f"(it is one of {takers})")
    return values


def _add_data(p, tokens_default):
    from .corpus import DEFAULT_CORPUS, EMBEDDED

    g = p.add_argument_group("data")
    g.add_argument("--tokens", type=int, default=tokens_default, help="corpus tokens to use")
    g.add_argument("--corpus", choices=EMBEDDED,
                   help=f"an embedded corpus (default when no --dataset/--data: {DEFAULT_CORPUS})")
    g.add_argument("--dataset", help="Hugging Face dataset name, streamed (needs the network)")
    g.add_argument("--split", default="train")
    g.add_argument("--text-column", default="text")
    g.add_argument("--data", help="local .txt, .jsonl or .parquet file")
    g.add_argument("--ctx-len", type=int, default=128, help="tokens per context")
    g.add_argument("--keep-bos", action="store_true",
                   help="keep each context's first position (BOS / attention sink) in the data")


def _data_spec(args, **kw):
    from .pipeline import DataSpec

    return DataSpec(corpus=args.corpus, dataset=args.dataset, data=args.data, split=args.split,
                    text_column=args.text_column, ctx_len=args.ctx_len, drop_bos=not args.keep_bos, **kw)


def _fail_if_exists(out, resume=False):
    if Path(out).exists() and any(Path(out).iterdir()) and not resume:
        raise NnsightSaeError(f"{out} exists and is not empty; choose another --out (or --resume)")


def _type_options() -> dict[str, type[Options]]:
    from .plugins import registry

    return {name: entry.obj.config_class for name, entry in registry().dictionary_types.items()}


def _method_options() -> dict[str, type[Options]]:
    from .plugins import registry

    return {name: entry.obj.Options for name, entry in registry().circuit_methods.items()}


def cmd_train(args) -> int:
    from . import distributed
    from .pipeline import RunSpec, train_and_evaluate, type_options
    from .plugins import registry
    from .sites import resolve_site

    types = {t: registry().get("dictionary_types", t) for t in args.type}  # bad input costs nothing
    hyper = _only_for(args, _type_options(), args.type, "--type")
    for cls in types.values():  # each type's options checked now, with a placeholder width
        for site in args.site:
            cls.config_class(d_in=1, d_sae=1 << 30, site=site, **type_options(cls, hyper))
    if args.tokens <= 0 or args.epochs <= 0 or args.batch_size <= 0:
        raise NnsightSaeError("--tokens, --epochs and --batch-size must be positive")
    data = _data_spec(args, tokens=args.tokens, eval_tokens=args.eval_tokens)
    _fail_if_exists(args.out, args.resume)
    model = _load_model(args)
    widths = args.d_sae or sorted({args.expansion * resolve_site(model, s).d_in for s in args.site})
    run = RunSpec(types=args.type, sites=args.site, d_sae=widths, hyper=hyper, epochs=args.epochs,
                  batch_size=args.batch_size, buffer_rows=args.buffer_rows)
    config = {"lr": args.lr, "seed": args.seed, "checkpoint_every": args.checkpoint_every}
    results = train_and_evaluate(model, data, run, config, args.out, resume=args.resume)
    distributed.end()
    if results:  # data-parallel runs: only the first process saves and evaluates
        print(json.dumps(results, indent=2))
    return 0


def cmd_bench(args) -> int:
    import torch

    from . import bench

    out = Path(args.out)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "train":
        results = bench.bench_train(_load_model(args), out, steps=args.steps)
    elif args.what == "circuit":
        from .tasks import get_task

        get_task(args.task)  # bad input fails before the model loads
        results = bench.bench_circuit(_load_model(args), out, task=args.task, method=args.method)
    else:
        results = (bench.bench_harvest if args.what == "harvest" else bench.bench_splice)(_load_model(args), out)
    for r in results:
        print(f"{r['what']}: ratio {r['ratio']} (ours {r['ours']}, baseline {r['baseline']} {r['unit']})")
    return 0


def cmd_circuit(args) -> int:
    from .circuits import circuit_method, method_options, read_reference, run_circuit
    from .tasks import get_task

    task = get_task(args.task)  # bad input fails before the model loads
    method = circuit_method(args.method)
    options = _only_for(args, _method_options(), [method.name], "--method")
    method_options(method, task, options)
    if args.reference:
        read_reference(args.reference)
    model = _load_model(args)
    result = run_circuit(model, args.task, args.out, method=method.name, options=options, n_prompts=args.n_prompts,
                         n_train=args.n_train, seed=args.seed, split=args.prompts, reference=args.reference,
                         ablation=args.ablation, faithfulness_k=args.k, curve=args.curve)
    top = ", ".join(f"L{h['layer']}H{h['head']}" for h in result["heads"][:10])
    print(f"{args.task} / {method.name} on {result['n_prompts']} {args.prompts} prompts: top heads {top}")
    if "metrics" in result:
        m = result["metrics"]
        print(f"ROC AUC {m['roc_auc']:.3f} against the reference's {m['k']} heads ("
              + ", ".join(f"top {n}: {v:.3f}" for n, v in m["roc_auc_top"].items())
              + f"); precision = recall @{m['k']} {m['precision_at_k']:.2f}")
    f = result["faithfulness"]
    print(f"top {f['k']} heads alone keep {f['top_k']:.0%} of the task metric "
          f"({f['metric_top_k']:.3f} vs clean {f['metric_clean']:.3f}, all ablated {f['metric_all_ablated']:.3f}); "
          f"random {f['k']}-head sets keep {f['random_k_mean']:.0%}"
          + (f"; the {f['k']} heads of largest positive effect keep {f['top_k_positive']:.0%}"
             if "top_k_positive" in f else ""))
    for row in f.get("curve", []):
        print(f"  k {row['k']:>4}: top by score keep {row['top_k']:.0%}"
              + (f", top by positive effect {row['top_k_positive']:.0%}" if "top_k_positive" in row else "")
              + (f", the reference's own top {row['reference_top_k']:.0%} (positive "
                 f"{row['reference_top_k_positive']:.0%})" if "reference_top_k" in row else "")
              + f", random {row['random_k_mean']:.0%}")
    plots = ["heads.png"] + ["roc.png"] * ("metrics" in result) + ["faithfulness.png"] * bool(args.curve)
    print(f"{result['seconds']['total']:.1f}s; wrote {args.out}/circuit.json and "
          + ", ".join(f"{args.out}/{name}" for name in plots))
    return 0


def cmd_reference(args) -> int:
    from .circuits import run_reference
    from .tasks import get_task

    get_task(args.task)
    if args.top <= 0:
        raise NnsightSaeError(f"--top must be positive, not {args.top}")
    model = _load_model(args)
    result = run_reference(model, args.task, args.out, n_prompts=args.n_prompts, top=args.top, seed=args.seed,
                           split=args.prompts, ablation=args.ablation)
    print(f"{args.task}: {args.ablation}-ablation reference circuit ({len(result['circuit'])} heads, "
          f"|effect| >= {result['threshold']:.3f}) in {result['seconds']:.0f}s; wrote {args.out}/reference.json")
    return 0


def cmd_eval(args) -> int:
    from .atomic import write_json
    from .evaluate import evaluate
    from .files import load_dictionary
    from .pipeline import token_contexts

    dictionary = load_dictionary(args.dict)
    data = _data_spec(args, eval_tokens=args.tokens)
    model = _load_model(args)
    result = evaluate(model, [dictionary], token_contexts(model, data, held_out=True), drop_bos=data.drop_bos)[0]
    write_json(Path(args.out) / "eval.json", result)
    print(json.dumps(result, indent=2))
    return 0


def _add_model(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="Hugging Face id, local folder or .gguf file (default: the embedded SmolLM2-135M)")
    g.add_argument("--device-map", type=_device_map, default=None,
                   help="where the model's layers go: auto, cpu, cuda:N, or a JSON object of module path -> "
                        "device (default: cuda:0 when there is a GPU, else cpu)")
    g.add_argument("--remote", nargs="?", const="ndif", choices=["ndif", "local"], default=None,
                   help="run every trace on NDIF (needs a Hub id and NDIF_API_KEY); 'local' simulates "
                        "the round trip here")


def _device_map(text):
    text = text.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"--device-map is not valid JSON: {e}")
    return text


def _load_model(args):
    """The model named by --model, placed by --device-map (default: the GPU when there is
    one, the CPU otherwise; one GPU per process in a data-parallel run), remote with --remote."""
    import torch

    from .models import load_model

    device_map = args.device_map
    if device_map is None and int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available():
        device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    remote = {"ndif": True, "local": "local"}.get(args.remote, False)
    return load_model(args.model, device_map=device_map, remote=remote)


def _add_prompts(p):
    p.add_argument("--prompts", choices=["train", "heldout"], default="train",
                   help="the task's prompt set: heldout shares no names, templates, events or centuries with train")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts and any fitting")


def _add_ablation(p, *, default, when):
    from .heads import ABLATIONS

    p.add_argument("--ablation", choices=list(ABLATIONS), default=default,
                   help="what an ablated head's output is replaced by: "
                        + "; ".join(f"{name}: {what}" for name, what in ABLATIONS.items()) + f" (default: {when})")


def build_parser() -> argparse.ArgumentParser:
    from .plugins import registry

    parser = argparse.ArgumentParser(
        prog="nnsight-sae", description="Sparse dictionaries as nnsight interventions.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("info", help="JSON of everything the plugins registered, with the plugin of each")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("pull", help="fetch a published dictionary from the Hugging Face Hub (only the files it "
                                    "needs), detect its layout, write it in ours")
    p.add_argument("repo", help="Hub repo id, e.g. EleutherAI/sae-pythia-70m-32k")
    p.add_argument("path", nargs="?", help="the dictionary's folder or file inside the repo")
    p.add_argument("--out", required=True, help="folder for the dictionary in our (SAELens) layout")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("convert", help="read a dictionary in any layout we read, write it in ours (or another)")
    p.add_argument("src", help="the dictionary's folder or file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--to", default="saelens", help="layout to write (see `info` formats with writes: true)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="harvest activations, train dictionaries, evaluate them")
    p.add_argument("--type", type=_csv(str), required=True, help="dictionary type(s), comma-separated")
    p.add_argument("--site", type=_csv(str), required=True, help="site(s), e.g. resid_post.6 (comma-separated)")
    p.add_argument("--out", required=True, help="output folder (one subfolder per dictionary if several)")
    _add_model(p)
    p.add_argument("--d-sae", type=_csv(int), help="dictionary width(s) (default: --expansion x site width)")
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1, help="passes over the harvested tokens")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--batch-size", type=int, default=256, help="activation rows per step")
    p.add_argument("--buffer-rows", type=int, default=65536, help="rows in the shuffling buffer")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for the final eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    _add_data(p, 300_000)
    add_merged_options(p.add_argument_group("dictionary options (each applies to the types that declare it)"),
                       _type_options())
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a dictionary on held-out text")
    p.add_argument("dict", help="dictionary folder")
    p.add_argument("--out", required=True, help="folder for eval.json")
    _add_model(p)
    _add_data(p, 8192)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("circuit", help="score every attention head for a task; circuit.json + plots")
    p.add_argument("--task", required=True, help="ioi, greater-than, docstring, or a PATH.jsonl task file")
    p.add_argument("--out", required=True)
    methods = registry().circuit_methods
    default = [n for n, e in methods.items() if e.obj.default]
    p.add_argument("--method", help=f"a circuit method: {', '.join(sorted(methods))} "
                                    f"(default: {', '.join(default) or 'none'})")
    p.add_argument("--reference", help="folder holding reference.json, for ROC AUC / precision / recall")
    p.add_argument("--n-prompts", type=int, default=40)
    p.add_argument("--n-train", type=int, default=10, help="prompts the method may fit on")
    p.add_argument("--k", type=int, help="heads kept for the faithfulness check (default: the reference's size, or 20)")
    p.add_argument("--curve", type=_csv(int), nargs="?", const=[5, 10, 20, 40, 80, 160],
                   help="faithfulness at several k (default 5,10,20,40,80,160): faithfulness.png")
    _add_ablation(p, default=None, when="the reference's, else mean")
    _add_prompts(p)
    _add_model(p)
    add_merged_options(p.add_argument_group("method options (each applies to the methods that declare it)"),
                       _method_options())
    p.set_defaults(func=cmd_circuit)

    p = sub.add_parser("reference", help="per-head ablation reference circuit; reference.json")
    p.add_argument("--task", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--top", type=int, default=20, help="heads in the reference circuit")
    _add_ablation(p, default="mean", when="mean")
    p.add_argument("--n-prompts", type=int, default=40)
    _add_prompts(p)
    _add_model(p)
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("bench", help="benchmarks: a ratio of ours to a baseline measured in the same run")
    p.add_argument("what", choices=["harvest", "train", "splice", "circuit"])
    p.add_argument("--out", required=True, help="folder for the JSON results")
    p.add_argument("--task", default="ioi", help="circuit: the task")
    p.add_argument("--method", help="circuit: the method timed against the reference (default: the default method)")
    p.add_argument("--steps", type=int, default=2000, help="train: training steps of each trainer")
    p.add_argument("--threads", type=int, help="torch threads in this process (default: torch's choice)")
    _add_model(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("analyze", help="run a registered analysis on a dictionary")
    analyses = p.add_subparsers(dest="analysis", required=True, metavar="NAME")
    for name, entry in sorted(registry().analyses.items()):
        a = analyses.add_parser(name, help=entry.obj.help, formatter_class=_ShowDefaults)
        if entry.obj.many_dictionaries:
            a.add_argument("--dicts", "--dict", dest="dict", type=_csv(str), required=True,
                           help="dictionary folders, comma-separated")
        else:
            a.add_argument("--dict", required=True, help="dictionary folder (cfg.json + sae_weights.safetensors)")
        a.add_argument("--out", required=True, help="output folder")
        _add_model(a)
        add_options(a.add_argument_group(f"{name} options"), entry.obj.Options)
        a.set_defaults(func=cmd_analyze)
    return parser



def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except NnsightSaeError as e:  # a plugin failed to load or clashes
        print(f"nnsight-sae: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)  # argparse itself exits 2 with one usage line on bad flags
    try:
        return args.func(args)
    except NnsightSaeError as e:
        print(f"nnsight-sae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nnsight-sae {args.command}: interrupted", file=sys.stderr)
        return 130
