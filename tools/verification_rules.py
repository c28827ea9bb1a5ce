"""Compare ways of choosing attribution's defaults (``--steps``, ``--verify``) without rerunning it
for each: the README's table of rules in "Faithfulness at the reference's level" and the choice of
``--steps`` per ablation in "Other ablations".

Verified heads get their exact single-head effect, so with every head's exact effect known (a
reference on the same prompts) each rule's ranking follows from the estimates alone: exact for its
N candidates (``verification_candidates``), the estimate for the rest. For each rule and each prompt
set this prints ROC AUC against the train reference's top 10 / top 20 (as ``nnsight-sae circuit
--reference TRAIN`` reports it) and, for the mean ablation, the positive-set faithfulness at
k = 20, 40, 80 (the k heads of largest positive effect kept alone, every other head mean-ablated)
and the train reference's own, as ``--curve 20,40,80`` reports them, with OK where the rule comes
within 10 points at every k.

    nnsight-sae reference --task T [--ablation A] --out TRAIN
    nnsight-sae reference --task T [--ablation A] --prompts heldout --out HELDOUT
    python tools/verification_rules.py --task T --train TRAIN --heldout HELDOUT

The ablation and prompt count are the references'; minutes on 2 cores (about 10 per task with
the faithfulness curves, 2 without).
"""

import argparse

import torch
from nnsight_sae_circuits.attribution import attribution_terms, verification_candidates

from nnsight_sae.circuits import CircuitRuns, read_reference, reference_effects, reference_sets, roc_auc
from nnsight_sae.heads import head_sites, replacements
from nnsight_sae.models import load_model
from nnsight_sae.tasks import get_task

STEPS = (0, 1, 2, 3)
VERIFY = (0, 20, 30, 40, 50, 60, 80)
KS = (20, 40, 80)


def positive_curve(runs: CircuitRuns):
    """A function of per-head effects: the faithfulness (%) of their k most positive heads kept alone."""
    def curve(effects):
        points = []
        for k in KS:
            keep = torch.zeros(effects.numel(), dtype=torch.bool)
            keep[effects.flatten().topk(k).indices] = True
            points.append(round(100 * runs.fraction(runs(keep.view(effects.shape)))))
        return points

    return curve


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--train", required=True, help="reference folder, train prompts")
    parser.add_argument("--heldout", required=True, help="reference folder, held-out prompts")
    args = parser.parse_args()
    model, task = load_model(), get_task(args.task)
    train = read_reference(args.train)
    ablation = train.get("ablation", "mean")
    for split, folder in (("train", args.train), ("heldout", args.heldout)):
        ref = read_reference(folder)
        if ref["split"] != split or ref.get("ablation", "mean") != ablation:
            raise SystemExit(f"{folder}: not a {ablation}-ablation reference on {split} prompts")
        prompts = task.prompts(model.tokenizer, ref["n_prompts"], seed=ref["seed"], split=split)
        replaced = replacements(model, prompts, ablation)
        shape = (len(replaced), head_sites(model)[0].n_heads)
        exact = reference_effects(ref, shape)
        tops = reference_sets(train, shape, sizes=(10, 20))
        curve = positive_curve(CircuitRuns(model, task, prompts, replaced, shape)) if ablation == "mean" else None
        own = curve(reference_effects(train, shape)) if curve else None
        print(f"{args.task}, {ablation} ablation, {split} prompts" + (f": the train reference's own {own}" if curve
                                                                      else ""), flush=True)
        for steps in STEPS:
            estimate, magnitude = attribution_terms(model, task, prompts, ablation=ablation, steps=steps,
                                                    replaced=replaced)
            for n in VERIFY:
                top = verification_candidates(estimate, magnitude, n)
                effects = torch.where(top, exact, estimate)
                auc = " / ".join(f"{roc_auc(effects.abs(), tops[size]):.3f}" for size in (10, 20))
                line = f"  --steps {steps} --verify {n:<3} AUC {auc}"
                if curve:
                    points = curve(effects)
                    line += f"  {points}{'  OK' if all(p >= o - 10 for p, o in zip(points, own)) else ''}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
