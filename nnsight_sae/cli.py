"""The ``nnsight-sae`` command line. Bad input: one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import NnsightSaeError


def cmd_info(args) -> int:
    from .plugins import registry

    print(json.dumps(registry().to_json(), indent=2))
    return 0


def cmd_analyze(args) -> int:
    from .analysis import run_analysis
    from .files import load_dictionary

    dictionary = load_dictionary(args.dict)  # checked before the model is loaded
    model = _load_model(args)
    options = {k: v for k, v in vars(args).items() if k not in _COMMON}
    run_analysis(args.analysis, model=model, dictionary=dictionary, out_dir=args.out, **options)
    print(f"wrote {args.out}/{args.analysis}.json")
    return 0


_COMMON = {"command", "func", "analysis", "dict", "model", "device_map", "remote", "out"}


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


def _add_data(p, tokens_default):
    g = p.add_argument_group("data")
    g.add_argument("--tokens", type=int, default=tokens_default, help="corpus tokens to use")
    g.add_argument("--dataset", help="Hugging Face dataset name, streamed (needs the network)")
    g.add_argument("--split", default="train")
    g.add_argument("--text-column", default="text")
    g.add_argument("--data", help="local .txt, .jsonl or .parquet file")
    g.add_argument("--ctx-len", type=int, default=128, help="tokens per context")
    g.add_argument("--keep-bos", action="store_true",
                   help="keep each context's first position (BOS / attention sink) in the data")


def _data_spec(args, **kw):
    from .pipeline import DataSpec

    return DataSpec(dataset=args.dataset, data=args.data, split=args.split, text_column=args.text_column,
                    ctx_len=args.ctx_len, drop_bos=not args.keep_bos, **kw)


def _fail_if_exists(out, resume=False):
    if Path(out).exists() and any(Path(out).iterdir()) and not resume:
        raise NnsightSaeError(f"{out} exists and is not empty; choose another --out (or --resume)")


def cmd_train(args) -> int:
    from .pipeline import RunSpec, end_distributed, train_and_evaluate
    from .plugins import registry

    for t in args.type:  # check what needs no model first, so bad input costs nothing
        registry().get("dictionary_types", t)
    if args.tokens <= 0 or args.epochs <= 0 or args.batch_size <= 0:
        raise NnsightSaeError("--tokens, --epochs and --batch-size must be positive")
    _fail_if_exists(args.out, args.resume)
    model = _load_model(args)
    from .sites import resolve_site

    widths = args.d_sae or sorted({args.expansion * resolve_site(model, s).d_in for s in args.site})
    hyper = {k: v for k, v in {"k": args.k, "l1_coefficient": args.l1, "tied": args.tied or None,
                               "skip": args.skip or None, "k_warmup": args.k_warmup or None}.items()
             if v is not None}
    run = RunSpec(types=args.type, sites=args.site, d_sae=widths, hyper=hyper, epochs=args.epochs,
                  batch_size=args.batch_size, buffer_rows=args.buffer_rows)
    config = {"lr": args.lr, "seed": args.seed, "checkpoint_every": args.checkpoint_every}
    results = train_and_evaluate(model, _data_spec(args, tokens=args.tokens, eval_tokens=args.eval_tokens),
                                 run, config, args.out, resume=args.resume)
    end_distributed()
    if results:  # data-parallel runs: only the first process saves and evaluates
        print(json.dumps(results, indent=2))
    return 0


def cmd_bench(args) -> int:
    from . import bench

    out = Path(args.out)

    if args.what == "train":
        results = bench.bench_train(out)
    elif args.what == "circuit":
        from .circuits import get_task

        get_task(args.task)  # bad input fails before the model loads
        results = bench.bench_circuit(_load_model(args), out, task=args.task, method=args.method)
    else:
        results = (bench.bench_harvest if args.what == "harvest" else bench.bench_splice)(_load_model(args), out)
    for r in results:
        print(f"{r['what']}: ratio {r['ratio']} (ours {r['ours']}, baseline {r['baseline']} {r['unit']})")
    return 0


def cmd_circuit(args) -> int:
    from .circuits import circuit_methods, get_task, read_reference, run_circuit

    get_task(args.task)  # bad input fails before the model loads
    if args.method not in circuit_methods():
        raise NnsightSaeError(f"unknown circuit method {args.method!r}; methods: {', '.join(sorted(circuit_methods()))}")
    if args.reference:
        read_reference(args.reference)
    model = _load_model(args)
    result = run_circuit(model, args.task, args.out, method=args.method, n_prompts=args.n_prompts,
                         n_train=args.n_train, seed=args.seed, split=args.prompts, reduce=args.reduce,
                         reference=args.reference, faithfulness_k=args.k, curve=args.curve)
    top = ", ".join(f"L{h['layer']}H{h['head']}" for h in result["heads"][:10])
    print(f"{args.task} / {args.method} on {result['n_prompts']} {args.prompts} prompts: top heads {top}")
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
              + f", random {row['random_k_mean']:.0%}")
    plots = ["heads.png"] + ["roc.png"] * ("metrics" in result) + ["faithfulness.png"] * bool(args.curve)
    print(f"{result['seconds']['total']:.1f}s; wrote {args.out}/circuit.json and "
          + ", ".join(f"{args.out}/{name}" for name in plots))
    return 0


def cmd_reference(args) -> int:
    from .circuits import get_task, run_reference

    get_task(args.task)
    if args.top <= 0:
        raise NnsightSaeError(f"--top must be positive, not {args.top}")
    model = _load_model(args)
    result = run_reference(model, args.task, args.out, n_prompts=args.n_prompts, top=args.top, seed=args.seed,
                           split=args.prompts)
    print(f"{args.task}: reference circuit ({len(result['circuit'])} heads, |effect| >= {result['threshold']:.3f}) "
          f"in {result['seconds']:.0f}s; wrote {args.out}/reference.json")
    return 0


def cmd_eval(args) -> int:
    from .analysis import write_json
    from .evaluate import evaluate
    from .files import load_dictionary
    from .pipeline import token_contexts

    dictionary = load_dictionary(args.dict)
    model = _load_model(args)
    data = _data_spec(args, eval_tokens=args.tokens)
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


def build_parser() -> argparse.ArgumentParser:
    from .circuits import DEFAULT_METHOD

    parser = argparse.ArgumentParser(
        prog="nnsight-sae", description="Sparse dictionaries as nnsight interventions.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("info", help="JSON of everything the plugins registered, with the plugin of each")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="harvest activations, train dictionaries, evaluate them")
    p.add_argument("--type", type=_csv(str), required=True, help="dictionary type(s), comma-separated")
    p.add_argument("--site", type=_csv(str), required=True, help="site(s), e.g. resid_post.6 (comma-separated)")
    p.add_argument("--out", required=True, help="output folder (one subfolder per dictionary if several)")
    _add_model(p)
    p.add_argument("--d-sae", type=_csv(int), help="dictionary width(s) (default: --expansion x site width)")
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1, help="passes over the harvested tokens")
    p.add_argument("--k", type=int, help="active features for topk / batchtopk (default 32)")
    p.add_argument("--k-warmup", action="store_true",
                   help="topk: start at 4k active features and anneal to k over the sparsity warm-up")
    p.add_argument("--l1", type=float, help="sparsity coefficient for relu, jumprelu, gated, transcoder")
    p.add_argument("--tied", action="store_true", help="relu: tied encoder/decoder")
    p.add_argument("--skip", action="store_true", help="transcoder: add a linear skip term")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--batch-size", type=int, default=256, help="activation rows per step")
    p.add_argument("--buffer-rows", type=int, default=65536, help="rows in the shuffling buffer")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for the final eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    _add_data(p, 300_000)
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
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"a circuit method (see `info`): {DEFAULT_METHOD} (default), code-overlap, code-overlap-edges, "
                        "mean-diff, or one a plugin registers")
    p.add_argument("--reference", help="folder holding reference.json, for ROC AUC / precision / recall")
    p.add_argument("--n-prompts", type=int, default=40)
    p.add_argument("--n-train", type=int, default=10, help="prompts the method may fit on")
    p.add_argument("--reduce", choices=["mean", "last"], default="mean",
                   help="code-overlap / mean-diff: head outputs averaged over positions or at the last one")
    p.add_argument("--k", type=int, help="heads kept for the faithfulness check (default: the reference's size, or 20)")
    p.add_argument("--curve", type=_csv(int), nargs="?", const=[5, 10, 20, 40, 80, 160],
                   help="faithfulness at several k (default 5,10,20,40,80,160): faithfulness.png")
    _add_prompts(p)
    _add_model(p)
    p.set_defaults(func=cmd_circuit)

    p = sub.add_parser("reference", help="per-head mean-ablation reference circuit; reference.json")
    p.add_argument("--task", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--top", type=int, default=20, help="heads in the reference circuit")
    p.add_argument("--n-prompts", type=int, default=40)
    _add_prompts(p)
    _add_model(p)
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("bench", help="benchmarks: a ratio of ours to a baseline measured in the same run")
    p.add_argument("what", choices=["harvest", "train", "splice", "circuit"])
    p.add_argument("--out", required=True, help="folder for the JSON results")
    p.add_argument("--task", default="ioi", help="circuit: the task")
    p.add_argument("--method", help=f"circuit: the method timed against the reference (default {DEFAULT_METHOD})")
    _add_model(p)
    p.set_defaults(func=cmd_bench)

    from .plugins import registry

    p = sub.add_parser("analyze", help="run a registered analysis on a dictionary")
    analyses = p.add_subparsers(dest="analysis", required=True, metavar="NAME")
    for name, entry in sorted(registry().analyses.items()):
        if getattr(entry.obj, "circuit_method", False):
            continue  # run through `circuit --method NAME`
        a = analyses.add_parser(name, help=entry.obj.help, formatter_class=_ShowDefaults)
        a.add_argument("--dict", required=True, help="dictionary folder (cfg.json + sae_weights.safetensors)")
        a.add_argument("--out", required=True, help="output folder")
        _add_model(a)
        entry.obj.add_arguments(a)
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
