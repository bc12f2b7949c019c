"""``kn bench findings``, part 2: a sweep over the update rule <h, r, t> -> <h, r, t'>.

Variants, each oriented by the neurons' activation signs on the locate prompts:

* ``paper``: lambda1 = 1, lambda2 = 8, raw embeddings (Dai et al. 2021);
* ``authors``: the released code's variant: embeddings rescaled to each value slot's norm, and
  neurons shared by more than ``max_share`` of the relation's facts left alone;
* ``calibrated``: per fact the smallest lambda2 of a ladder that makes t' the top prediction
  on the prompts used to locate (:func:`kn_plugin.editing.calibrated_update`).

Measured per edited fact: efficacy (t' on top on the edited prompts, P(t')), generalization
(t' on top on held-out paraphrases never used to locate or calibrate), specificity (the top
prediction of other facts of the same relation and of other relations unchanged) and the
perplexity of those other facts before and after, reported as median, geometric mean and mean.
"""

from __future__ import annotations

import math

from kn_plugin.editing import calibrated_update, update_fact
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.evaluation import per_fact_perplexities, spread, update_measures
from kn_plugin.models import LoadedModel
from kn_plugin.scoring import encode_fact

VARIANTS = ("paper", "authors", "calibrated")


def _variant_edit(model, variant: str, neurons, old: str, new: str, prompts: list[str], shares: dict, config):
    if variant == "paper":
        return update_fact(model, neurons, old, new, lambda1=1.0, lambda2=8.0, prompts=prompts), 8.0, None
    if variant == "authors":
        return update_fact(model, neurons, old, new, lambda1=1.0, lambda2=8.0, scale="norm", prompts=prompts,
                           shared=shares, max_share=config.max_share), 8.0, None
    edit, lam, reached = calibrated_update(model, neurons, old, new, prompts, ladder=config.lambda2_ladder)
    return edit, lam, reached


def update_task(model: LoadedModel, rec: dict, new_target: str, intra: list[dict], inter: list[dict], shares: dict,
                config) -> dict:
    """Every variant on one fact: edit, measure, undo."""
    neurons = [(layer, i) for layer, i, _ in rec["neurons"]]
    edited = [encode_fact(model, p, rec["target"]) for p in rec["locate_prompts"]]
    edited_new = [encode_fact(model, p, new_target) for p in rec["locate_prompts"]]
    held = [encode_fact(model, p, rec["target"]) for p in rec["held_prompts"]]
    controls = [encode_fact(model, r["prompts"][0], r["target"]) for r in intra + inter]
    n_intra = len(intra)
    new_id = edited_new[0].target_ids[0]

    def measure() -> dict:
        m = update_measures(model, edited, edited_new, held, controls)
        return {"edited_top": m["top"], "p_new": [math.exp(x) for x in m["new_logp"]], "held_top": m["held_top"],
                "control_top": m["control_top"], "control_ppl": per_fact_perplexities(controls, m["control_logp"])}

    before = measure()
    out = {"key": rec["key"], "relation": rec["relation"], "old": rec["target"], "new": new_target,
           "n_neurons": len(neurons), "n_intra": n_intra, "before": before, "variants": {}}
    for variant in VARIANTS:
        try:
            edit, lam, reached = _variant_edit(model, variant, neurons, rec["target"], new_target,
                                               rec["locate_prompts"], shares, config)
        except KnowledgeNeuronError as exc:  # e.g. every neuron shared too widely to be edited
            out["variants"][variant] = {"skipped": str(exc)}
            continue
        with edit.applied(model):
            after = measure()
        unchanged = [a == b for a, b in zip(after["control_top"], before["control_top"])]
        out["variants"][variant] = {
            "lambda2": lam, "reached": reached, "n_slots": len(edit.slots), "after": after,
            "efficacy": sum(t == new_id for t in after["edited_top"]) / len(edited),
            "generalization": sum(t == new_id for t in after["held_top"]) / len(held) if held else None,
            "intra_unchanged": sum(unchanged[:n_intra]) / n_intra if n_intra else None,
            "inter_unchanged": sum(unchanged[n_intra:]) / (len(unchanged) - n_intra) if len(unchanged) > n_intra
            else None,
        }
    return out


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize_updates(rows: list[dict]) -> dict:
    """Per variant: efficacy, generalization, specificity and the control facts' perplexity
    before/after (median, geometric mean, mean over every (edit, control fact) pair)."""
    out = {}
    for variant in VARIANTS:
        done = [(r, r["variants"][variant]) for r in rows if "after" in r["variants"].get(variant, {})]
        before_ppl = [p for r, _ in done for p in r["before"]["control_ppl"]]
        after_ppl = [p for _, v in done for p in v["after"]["control_ppl"]]
        ratios = [a / b for a, b in zip(after_ppl, before_ppl) if b > 0 and math.isfinite(a)]
        out[variant] = {
            "facts": len(done), "skipped": sum(1 for r in rows if "skipped" in r["variants"].get(variant, {})),
            "efficacy": _mean([v["efficacy"] for _, v in done]),
            "p_new_before": _mean([_mean(r["before"]["p_new"]) for r, _ in done]),
            "p_new_after": _mean([_mean(v["after"]["p_new"]) for _, v in done]),
            "generalization": _mean([v["generalization"] for _, v in done]),
            "intra_unchanged": _mean([v["intra_unchanged"] for _, v in done]),
            "inter_unchanged": _mean([v["inter_unchanged"] for _, v in done]),
            "ppl_before": spread(before_ppl), "ppl_after": spread(after_ppl), "ppl_ratio": spread(ratios),
            "lambda2": spread([v["lambda2"] for _, v in done]),
            "reached": _mean([float(v["reached"]) for _, v in done if v["reached"] is not None]),
        }
    return out


def choose_default(summary: dict, tolerance: float = 0.1) -> tuple[str, str]:
    """The variant to recommend and why: the paper's rule unless another has at least its
    efficacy minus ``tolerance`` and better specificity (mean of intra and inter unchanged)."""
    def spec(v):
        return _mean([v["intra_unchanged"], v["inter_unchanged"]])

    paper = summary["paper"]
    if not paper["facts"]:
        return "paper", "no fact could be edited"
    best, why = "paper", "no other variant kept more control facts unchanged at a similar efficacy"
    for name in ("authors", "calibrated"):
        v = summary[name]
        if not v["facts"] or v["efficacy"] is None or spec(v) is None:
            continue
        if v["efficacy"] >= paper["efficacy"] - tolerance and spec(v) > spec(summary[best]):
            best = name
            why = (f"efficacy {v['efficacy']:.0%} vs the paper's {paper['efficacy']:.0%}, control facts unchanged "
                   f"{spec(v):.0%} vs {spec(paper):.0%}, median control perplexity x{v['ppl_ratio']['median']:.2f} "
                   f"vs x{paper['ppl_ratio']['median']:.2f}")
    return best, why
