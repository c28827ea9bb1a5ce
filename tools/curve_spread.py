"""How much the positive-set faithfulness curve depends on the 40 prompts a ranking was taken from:
the figures of "The bar moves with the prompt sample" in the README.

Each folder holds every head's signed effect, from the prompts it was run on: a circuit's estimates
(``circuit.json``) or a reference's exact effects (``reference.json``). For each,
this prints the faithfulness of its k most positive heads kept alone (every other head
mean-ablated) at k = 20, 40, 80, on one fresh sample of prompts shared by all, larger than the 40
the rankings came from, so that what differs between rows is the ranking and not the sample it is
scored on.

    nnsight-sae reference --task T [--seed S] --out R_S                 # exact effects, train prompts
    nnsight-sae circuit --task T [--prompts heldout] [--seed S] --out C_S
    python tools/curve_spread.py --task T [--prompts heldout] R_0 R_1 C_0 C_1

About 2 minutes per task and prompt set on 2 cores with 160 prompts (6 on docstring).
"""

import argparse
import json
from pathlib import Path

import torch
from verification_rules import positive_curve

from nnsight_sae.circuits import CircuitRuns, read_reference, reference_effects
from nnsight_sae.heads import head_sites, replacements
from nnsight_sae.models import load_model
from nnsight_sae.tasks import get_task


def ranking(folder: Path, shape) -> tuple[dict, torch.Tensor]:
    """A folder's run (its JSON) and every head's signed effect: a circuit's estimates or a
    reference's exact effects."""
    circuit = folder / "circuit.json"
    run = json.loads(circuit.read_text()) if circuit.exists() else read_reference(folder)
    if not all("effect" in h for h in run["heads"]):
        raise SystemExit(f"{folder}: its method gives no signed effect per head")
    return run, reference_effects(run, shape)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--prompts", choices=["train", "heldout"], default="train", help="the prompt set to score on")
    parser.add_argument("--n-prompts", type=int, default=160)
    parser.add_argument("--seed", type=int, default=7, help="seeds the sample scored on")
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args()
    model, task = load_model(), get_task(args.task)
    sites = head_sites(model)
    shape = (len(sites), sites[0].n_heads)
    rankings = {}
    for folder in args.folders:
        run, values = ranking(folder, shape)
        if run["task"] != args.task or run.get("ablation", "mean") != "mean":
            raise SystemExit(f"{folder}: not a mean-ablation run of {args.task}")
        rankings[f"{folder.name} ({run.get('method', 'mean-ablation')}, {run['split']} prompts, seed {run['seed']})"] = values
    prompts = task.prompts(model.tokenizer, args.n_prompts, seed=args.seed, split=args.prompts)
    curve = positive_curve(CircuitRuns(model, task, prompts, replacements(model, prompts, "mean"), shape))
    print(f"{args.task}, {len(prompts)} {args.prompts} prompts (seed {args.seed}): positive set kept alone, "
          f"k = 20 / 40 / 80")
    for label, values in rankings.items():
        print(f"  {label}: " + " / ".join(f"{x}%" for x in curve(values)), flush=True)


if __name__ == "__main__":
    main()
