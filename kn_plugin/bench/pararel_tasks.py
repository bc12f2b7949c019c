"""The work of ``kn bench pararel``, one function per stage and record (run in this process or on
Ray workers): a fact's attributions, its interventions, an unrelated fact, an update, an erasure."""

from __future__ import annotations

import logging
import random
import time
import warnings

import torch

from kn_plugin import paper
from kn_plugin.attribution import STEP_RULES
from kn_plugin.bench.pararel_data import ParaRelConfig, _r, content_hash, locate_indices
from kn_plugin.editing import WeightEdit, read_slots, update_fact
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.evaluation import predictions, random_neurons, update_measures, variant_probs
from kn_plugin.locating import LowProbabilityWarning, locate_quietly
from kn_plugin.models import LoadedModel
from kn_plugin.scoring import assess, encode_fact

logger = logging.getLogger(__name__)


def fact_task(model: LoadedModel, fact, config: ParaRelConfig) -> dict:
    """Assess every prompt of a PARAREL fact; for a fact the model knows, the IG and activation
    coarse sets of its locate prompts (in this process or on a Ray worker)."""
    t0 = time.perf_counter()
    rec = {"key": fact.key, "relation": fact.relation, "subject": fact.subject, "target": fact.target,
           "content": content_hash(fact.prompts, fact.target), "prompts": [], "prob": [], "rank": [], "top": []}
    for p in fact.prompts:
        try:
            a = assess(model, p, fact.target, k=1)
        except KnowledgeNeuronError as exc:
            logger.info("%s: skipping prompt %r (%s)", fact.key, p, exc)
            continue
        rec["prompts"].append(p)
        rec["prob"].append(_r(a.prob))
        rec["rank"].append(a.rank)
        rec["top"].append(a.rank == 0)
    rec["target_id"] = encode_fact(model, fact.prompts[0], fact.target).target_ids[0]
    known = [r < config.max_rank for r in rec["rank"]]
    rec["known_share"] = sum(known) / len(known) if known else 0.0
    rec["counted"] = len(known) >= config.min_prompts and rec["known_share"] >= config.min_known
    if rec["counted"]:
        idx = locate_indices(fact.key, len(rec["prompts"]), config.locate_prompts, config.seed)
        with warnings.catch_warnings():  # the record keeps every prompt's probability
            warnings.simplefilter("ignore", LowProbabilityWarning)
            res = locate_quietly(model, [rec["prompts"][i] for i in idx], fact.target, config=config.locate)
        atts = res.attributions
        rec["locate"] = idx
        rec["ig_coarse"] = [paper.coarse_set(a.scores, config.threshold) for a in atts]
        rec["base_coarse"] = [paper.coarse_set(a.activations, config.base_threshold) for a in atts]
        rec["steps_used"] = [a.steps for a in atts]
        if config.steps in STEP_RULES:  # each layer's own m
            rec["steps_per_layer"] = [a.extras.get("steps_per_layer") for a in atts]
        effect = [(a.target_prob - a.zeroed_prob).abs() for a in atts]
        rec["max_gap"] = [_r(float((a.completeness_gap.abs() / (e + 1e-4)).max())) for a, e in zip(atts, effect)]
        rec["engine"] = sorted({a.engine for a in atts})
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def refine_relations(facts: dict[str, list[dict]], config: ParaRelConfig) -> dict:
    """Per relation the released code's p tuning, for IG and for the activation baseline:
    ``{"relations": {rel: {...}}, "sets": {key: {"kn": [...], "base": [...]}}}``."""
    out = {"relations": {}, "sets": {}}
    for rel, recs in facts.items():
        located = [r for r in recs if r.get("ig_coarse") is not None]
        if not located:
            continue
        info = {}
        for name, field in (("kn", "ig_coarse"), ("base", "base_coarse")):
            sets, used, mean = paper.tune_relation([r[field] for r in located], share=config.share,
                                                   min_sharing=config.min_sharing)
            info[name] = {"share": used, "mean_size": mean}
            for r, s in zip(located, sets):
                out["sets"].setdefault(r["key"], {})[name] = [list(n) for n in s]
        out["relations"][rel] = info
    return out


def unrelated_fact(rec: dict, facts: dict[str, list[dict]], seed: int) -> dict | None:
    """A counted fact of another relation, drawn with the seed: the relation from the other
    relations, then the fact from that relation's counted facts."""
    rng = random.Random(f"{seed}-{rec['key']}-unrelated")
    others = sorted(r for r in facts if r != rec["relation"] and any(f["counted"] for f in facts[r]))
    if not others:
        return None
    rel = rng.choice(others)
    return rng.choice([f for f in facts[rel] if f["counted"]])


def effect_task(model: LoadedModel, rec: dict, sets: dict, config: ParaRelConfig) -> dict:
    """Suppress and amplify on every prompt of the fact (one batched forward per prompt)."""
    t0 = time.perf_counter()
    kn, base = [tuple(n) for n in sets["kn"]], [tuple(n) for n in sets.get("base", [])]
    draws = [random_neurons(kn, model.d_mlp, seed=int(content_hash(rec["key"], d, config.seed), 16) % 2**31)
             for d in range(config.random_draws)]
    groups = [("kn", kn), ("base", base)] + [(f"random{d}", s) for d, s in enumerate(draws)]
    variants = [([], 1.0)] + [(s, f) for _, s in groups for f in (0.0, 2.0)]
    out = {"key": rec["key"], "relation": rec["relation"], "kn": [list(n) for n in kn],
           "base": [list(n) for n in base], "locate": rec["locate"]}
    cols: dict[str, list[float]] = {}
    for p in rec["prompts"]:
        probs, _ = variant_probs(model, encode_fact(model, p, rec["target"]), variants)
        cols.setdefault("before", []).append(_r(probs[0]))
        for g, (name, _) in enumerate(groups):
            for j, op in enumerate(("suppress", "amplify")):
                cols.setdefault(f"{name}_{op}", []).append(probs[1 + 2 * g + j])
    for op in ("suppress", "amplify"):
        out[f"kn_{op}"] = [_r(x) for x in cols[f"kn_{op}"]]
        out[f"base_{op}"] = [_r(x) for x in cols[f"base_{op}"]]
        out[f"random_{op}"] = [_r(sum(col) / len(draws)) for col in
                               zip(*(cols[f"random{d}_{op}"] for d in range(len(draws))))]
    out["before"] = cols["before"]
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def unrelated_task(model: LoadedModel, rec: dict, neurons: list, unrelated: dict) -> dict:
    """A fact's knowledge neurons suppressed and amplified on every prompt of an unrelated fact
    (its own record: growing a run redraws the unrelated fact, not the fact's effects)."""
    t0 = time.perf_counter()
    kn = [tuple(n) for n in neurons]
    out = {"key": rec["key"], "relation": rec["relation"], "unrelated": unrelated["key"],
           "unrelated_relation": unrelated["relation"], "before": [], "suppress": [], "amplify": []}
    for p in unrelated["prompts"]:
        probs, _ = variant_probs(model, encode_fact(model, p, unrelated["target"]), [([], 1.0), (kn, 0.0), (kn, 2.0)])
        for name, x in zip(("before", "suppress", "amplify"), probs):
            out[name].append(_r(x))
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def update_task(model: LoadedModel, rec: dict, neurons: list, new_target: str, intra: list[dict],
                inter: list[dict], config: ParaRelConfig) -> dict:
    """Update one fact to ``new_target`` (the authors' rule), measure on the prompts the model
    answered correctly before, and around it on control facts; undo."""
    t0 = time.perf_counter()
    right = [p for p, top in zip(rec["prompts"], rec["top"]) if top]
    edit = update_fact(model, [tuple(n) for n in neurons], rec["target"], new_target, lambda1=config.lambda1,
                       lambda2=config.lambda2, scale="norm", prompts=right)
    old = [encode_fact(model, p, rec["target"]) for p in right]
    new = [encode_fact(model, p, new_target) for p in right]
    controls = [encode_fact(model, p, r["target"]) for r in intra + inter for p in r["prompts"]]
    sizes = [len(r["prompts"]) for r in intra + inter]

    def log_ppl(logps: list[float]) -> list[float]:
        """Per control fact: mean over its prompts of -log P(object) (the released code's log-ppl)."""
        out, at = [], 0
        for n in sizes:
            out.append(_r(-sum(logps[at:at + n]) / n))
            at += n
        return out

    def measure():
        m = update_measures(model, old, new, controls=controls)
        ppl = log_ppl(m["control_logp"])
        return {"top": m["top"], "old": [_r(pow(2.718281828459045, x)) for x in m["old_logp"]],
                "new": [_r(pow(2.718281828459045, x)) for x in m["new_logp"]],
                "intra_log_ppl": ppl[:len(intra)], "inter_log_ppl": ppl[len(intra):]}

    before = measure()
    with edit.applied(model):
        after = measure()
    rates = paper.update_rates(before["top"], after["top"], old[0].target_ids[0], new[0].target_ids[0])
    return {"key": rec["key"], "relation": rec["relation"], "old": rec["target"], "new": new_target,
            "neurons": [list(n) for n in neurons], "n_slots": len(edit.slots), "answered": right,
            "intra": [r["key"] for r in intra], "inter": [r["key"] for r in inter],
            "before": before, "after": after, **rates, "seconds": round(time.perf_counter() - t0, 2)}


def erase_task(model: LoadedModel, relation: str, neurons: list, relation_facts: list[dict],
               others: list[dict], config: ParaRelConfig) -> dict:
    """Zero the value slots of ``neurons`` (the released code's erase), measure, undo."""

    slots = [tuple(n) for n in neurons]
    old = read_slots(model, slots)
    edit = WeightEdit(model.name, model.n_layers, model.d_mlp, slots, old, torch.zeros_like(old), "erase",
                      {"rule": f"released code: top {config.erase_top}, zeroed"}, model.fingerprint)

    def measure(recs):
        facts = [encode_fact(model, p, r["target"]) for r in recs for p in r["prompts"]]
        tops, lps = predictions(model, facts)
        return {"log_ppl": [_r(-x) for x in lps],
                "correct": [t == f.target_ids[0] for t, f in zip(tops, facts)]}

    before = {"relation": measure(relation_facts), "other": measure(others)}
    with edit.applied(model):
        after = {"relation": measure(relation_facts), "other": measure(others)}
    return {"relation": relation, "neurons": [list(n) for n in slots], "facts": [r["key"] for r in relation_facts],
            "others": [r["key"] for r in others], "before": before, "after": after}
