"""The ``nnsight-sae`` command line. Bad input: one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import NnsightSaeError


def cmd_info(args) -> int:
    from .plugins import registry

    print(json.dumps(registry().to_json(), indent=2))
    return 0


def cmd_analyze(args) -> int:
    from .analysis import run_analysis
    from .files import load_dictionary
    from .models import load_model

    dictionary = load_dictionary(args.dict)  # checked before the model is loaded
    model = load_model(args.model)
    options = {k: v for k, v in vars(args).items() if k not in _COMMON}
    run_analysis(args.analysis, model=model, dictionary=dictionary, out_dir=args.out, **options)
    print(f"wrote {args.out}/{args.analysis}.json")
    return 0


_COMMON = {"command", "func", "analysis", "dict", "model", "out"}


def _add_model(p):
    p.add_argument("--model", default=None,
                   help="Hugging Face id, local folder or .gguf file (default: the embedded SmolLM2-135M)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnsight-sae", description="Sparse dictionaries as nnsight interventions.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("info", help="JSON of everything the plugins registered, with the plugin of each")
    p.set_defaults(func=cmd_info)

    from .plugins import registry

    p = sub.add_parser("analyze", help="run a registered analysis on a dictionary")
    analyses = p.add_subparsers(dest="analysis", required=True, metavar="NAME")
    for name, entry in sorted(registry().analyses.items()):
        a = analyses.add_parser(name, help=entry.obj.help)
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
