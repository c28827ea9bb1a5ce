"""Circuit discovery on the embedded SmolLM2 (slow: minutes on 2 cores, mostly two patching
references: IOI's on 40 prompts, as the README's, greater-than's on 24 to keep `make test` short). The figures are in
the README's circuits tables. IOI is checked against its reference here; the same comparison on
greater-than and docstring is the README's documented command, `nnsight-sae reference --task T
--out R` then `nnsight-sae circuit --task T [--prompts heldout] --reference R --out C`, whose
figures it records."""

import json

import pytest

from nnsight_sae import NnsightSaeError
from nnsight_sae.circuits import run_circuit, run_reference
from nnsight_sae.tasks import get_task

pytestmark = pytest.mark.slow

TASKS = ["ioi", "greater-than", "docstring"]
REFERENCE_PROMPTS = 24


@pytest.fixture(scope="module")
def ioi_reference(smol, tmp_path_factory):
    """The folder of IOI's reference.json (40 train prompts, top 20 heads: the README's), computed once."""
    folder = tmp_path_factory.mktemp("reference-ioi")
    run_reference(smol, "ioi", folder, progress=False)
    return folder


def test_heldout_prompts_share_nothing_with_train(smol):
    from nnsight_sae_circuits import tasks

    for name, lists in [("ioi", (tasks.NAMES, tasks.IOI_TEMPLATES, tasks.PLACES, tasks.OBJECTS)),
                        ("greater-than", (tasks.EVENTS, tasks.CENTURIES)),
                        ("docstring", (tasks.ARG_NAMES, tasks.FUNC_NAMES, tasks.SUMMARIES))]:
        for values in lists:
            assert not set(values["train"]) & set(values["heldout"]), name
        task = get_task(name)
        train = task.prompts(smol.tokenizer, 40, split="train")
        heldout = task.prompts(smol.tokenizer, 40, split="heldout")
        assert len(heldout) >= 36 and not set(train.positive) & set(heldout.positive), name
    ioi = get_task("ioi").prompts(smol.tokenizer, 40, split="heldout")
    assert all(any(n in p for n in tasks.NAMES["heldout"]) for p in ioi.positive)
    assert not any(f" {n} " in p for p in ioi.positive for n in tasks.NAMES["train"])
    with pytest.raises(NnsightSaeError, match="unknown prompt split 'test'"):
        get_task("ioi").prompts(smol.tokenizer, 4, split="test")


def test_independent_task_files_are_the_scripts_output_and_share_nothing_with_the_tasks(smol, tmp_path):
    """examples/tasks/*-independent.jsonl (the README's check of circuits against a user's own
    prompts): what tools/make_task_files.py writes, every line usable on SmolLM2, nothing shared with
    either built-in prompt set; IOI's metric is the logit difference, greater-than's log p(answer)."""
    import random
    import runpy
    from pathlib import Path

    import torch
    from nnsight_sae_circuits import tasks

    from nnsight_sae.heads import last_logits

    root = Path(__file__).resolve().parents[1]
    script = runpy.run_path(str(root / "tools" / "make_task_files.py"))
    script["write"](tmp_path, "ioi-independent.jsonl", script["ioi_lines"](64, random.Random(0)))
    script["write"](tmp_path, "greater-than-independent.jsonl", script["greater_than_lines"](64, random.Random(0)))
    for name in ("ioi-independent.jsonl", "greater-than-independent.jsonl"):
        assert (tmp_path / name).read_text() == (root / "examples" / "tasks" / name).read_text(), name
    builtin = {
        "NAMES": tasks.NAMES, "PLACES": tasks.PLACES, "OBJECTS": tasks.OBJECTS, "EVENTS": tasks.EVENTS,
        "IOI_TEMPLATES": tasks.IOI_TEMPLATES, "CENTURIES": tasks.CENTURIES}
    for key, lists in builtin.items():
        assert not set(script[key]) & (set(lists["train"]) | set(lists["heldout"])), key
    for name, metric in [("ioi", "logit difference"), ("greater-than", "log p")]:
        task = get_task(str(root / "examples" / "tasks" / f"{name}-independent.jsonl"))
        prompts = task.prompts(smol.tokenizer)
        assert len(prompts) == 64 and prompts.skipped == 0, name
        logits = last_logits(smol, prompts.positive[:8])
        first = prompts.subset(range(8))
        picked = logits.gather(-1, torch.tensor(first.answers)[:, None]).squeeze(-1)
        if metric == "log p":
            expected = picked - torch.logsumexp(logits, -1)
        else:
            expected = picked - logits.gather(-1, torch.tensor(first.wrong)[:, None]).squeeze(-1)
        torch.testing.assert_close(task.metric(logits, first), expected)
        negative = task.metric(last_logits(smol, first.negative), first)
        assert (task.metric(logits, first) > negative).float().mean() >= 0.75, name


@pytest.mark.parametrize("task", TASKS)
def test_the_model_does_each_task_on_both_prompt_sets(smol, task):
    from nnsight_sae.heads import last_logits

    t = get_task(task)
    for split in ("train", "heldout"):
        prompts = t.prompts(smol.tokenizer, 40, split=split)
        positive = t.metric(last_logits(smol, prompts.positive), prompts)
        assert positive.mean() > 0.3 and (positive > 0).float().mean() >= 0.8, (split, positive)


def test_default_method_recovers_the_reference_on_unseen_prompts(smol, ioi_reference, tmp_path):
    task, reference, results = "ioi", ioi_reference, {}
    for split in ("train", "heldout"):
        c = run_circuit(smol, task, tmp_path / split, split=split, reference=reference, n_random=3)
        assert c["method"] == "attribution"
        assert c["metrics"]["roc_auc"] >= 0.85, (split, c["metrics"])
        f = c["faithfulness"]
        # the top heads alone keep more of the task than any random set of as many heads
        assert min(f["top_k"], f["top_k_positive"]) > max(f["random_k"]) + 0.1, (split, f)
        assert f["top_k_positive"] >= 0.6 and f["random_k_mean"] <= 0.1, (split, f)
        results[split] = c

    baseline = run_circuit(smol, task, tmp_path / "mean-diff", method="mean-diff", split="heldout",
                           reference=reference, n_random=1)
    assert results["heldout"]["metrics"]["roc_auc"] > baseline["metrics"]["roc_auc"]


def test_default_method_keeps_ioi_as_the_reference_does(smol, ioi_reference, tmp_path):
    """Issue 18 part 4, the README's IOI train cell: the default method's most positive heads keep as
    much of the task as the reference's own, within 10 points at k = 20, 40 and 80 (measured 115% /
    127% / 138% against 119% / 121% / 133%); the first-order estimate alone (``steps`` 0, ``verify``
    0, the default before) keeps 95% / 112% / 100%. The README has the other five cells."""
    def curve(options):
        c = run_circuit(smol, "ioi", tmp_path / str(len(options)), reference=ioi_reference, options=options,
                        n_random=1, curve=[20, 40, 80])
        print(json.dumps(c["faithfulness"]["curve"]))
        return c, [(row["top_k_positive"], row["reference_top_k_positive"]) for row in c["faithfulness"]["curve"]]

    c, rows = curve({})
    assert c["options"] == {"steps": 2, "verify": 40}
    assert all(ours >= theirs - 0.10 for ours, theirs in rows), rows
    assert c["metrics"]["roc_auc_top"]["10"] >= 0.95, c["metrics"]
    _, first_order = curve({"steps": 0, "verify": 0})
    assert any(ours < theirs - 0.10 for ours, theirs in first_order), first_order


def test_default_method_follows_a_reference_of_another_ablation(smol, tmp_path):
    """A user's reference that replaces each head by its negatives' mean over all positions (the
    definition of the independent check in issue 18): the default method estimates that ablation
    and ranks the reference's top 10 and top 20 with ROC AUC >= 0.85 on train and held-out prompts."""
    ref = run_reference(smol, "greater-than", tmp_path / "ref", ablation="position-mean", n_prompts=REFERENCE_PROMPTS,
                        progress=False)
    assert ref["ablation"] == "position-mean"
    for split in ("train", "heldout"):
        c = run_circuit(smol, "greater-than", tmp_path / split, split=split, reference=tmp_path / "ref", n_random=1)
        assert c["ablation"] == "position-mean"
        auc = c["metrics"]["roc_auc_top"]
        assert min(auc["10"], auc["20"]) >= 0.85, (split, auc)
