"""``kn bench findings``, part 1: are knowledge neurons activated by knowledge-expressing prompts?

The paper's claim (Dai et al. 2021, section 4.4): the neurons located for a fact fire more on
other prompts expressing that fact than on prompts about something else. For each counted
fact the neurons are located on part of its paraphrases; their mean activation at the
prediction position is then measured on

* T1: the fact's held-out paraphrases (never used to locate);
* T2: prompts of other relations with the same subject;
* T3: prompts of unrelated facts (another subject and another relation).

Results per relation and overall, with bootstrap confidence intervals over facts, and the
share of knowledge neurons that facts of the same relation have in common versus facts of
different relations. Resumable: one file per fact (shared with the update sweep of
:mod:`kn_plugin.bench.update_sweep`, which edits on the same split).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from functools import cached_property
from itertools import combinations
from pathlib import Path

from kn_plugin.attribution import clean_pass
from kn_plugin.bench.common import assess_fact, report_header
from kn_plugin.bench.update_sweep import VARIANTS, update_task
from kn_plugin.defaults import PAPER_STEPS
from kn_plugin.editing import neuron_shares
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.inspection import inspect_neuron
from kn_plugin.locating import LocateConfig, locate_quietly
from kn_plugin.models import LoadedModel
from kn_plugin.plotting import plot_interval_groups
from kn_plugin.runs import check_run, clear_stale, resumable
from kn_plugin.scoring import encode_fact

logger = logging.getLogger(__name__)

GROUPS = ("T1", "T2", "T3")
GROUP_NAMES = {"T1": "held-out paraphrases of the fact", "T2": "other relations, same subject",
               "T3": "unrelated facts"}


@dataclass(frozen=True)
class FindingsConfig:
    """Checked settings of ``kn bench findings``."""

    steps: int = PAPER_STEPS
    batch_size: int = 10
    max_rank: int = 10
    min_known: float = 0.5
    locate_prompts: int = 3  # paraphrases used to locate; the rest are held out (at least one)
    other_prompts: int = 3  # T2 and T3 prompts per fact
    bootstrap: int = 1000
    seed: int = 0
    engine: str = "fast"
    update_facts: int = 3  # per relation, for the update sweep
    lambda2_ladder: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    max_share: float = 0.1  # the authors' variant skips neurons shared by more of the relation's facts
    control_facts: int = 10  # specificity: other facts of the relation and of other relations

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_rank", "other_prompts", "bootstrap", "control_facts"):
            if getattr(self, name) < 1:
                raise KnowledgeNeuronError(f"{name.replace('_', ' ')} must be >= 1")
        if self.locate_prompts < 2:
            raise KnowledgeNeuronError("locating needs at least 2 prompts (refinement across paraphrases)")
        if not 0 < self.min_known <= 1 or not 0 < self.max_share <= 1:
            raise KnowledgeNeuronError("min_known and max_share must be in (0, 1]")
        if self.update_facts < 0 or not self.lambda2_ladder or any(x <= 0 for x in self.lambda2_ladder):
            raise KnowledgeNeuronError("update facts must be >= 0 and the lambda2 ladder positive")
        self.locate  # noqa: B018 - the locate settings, checked once here

    @cached_property
    def locate(self) -> LocateConfig:
        """How each fact's locate split is attributed and refined (the paper's adaptive p)."""
        return LocateConfig(steps=self.steps, batch_size=self.batch_size, engine=self.engine, progress=False)


def split_prompts(record: dict, config: FindingsConfig) -> tuple[list[str], list[str]]:
    """Known prompts first (in file order), the first ``locate_prompts`` to locate, the rest held out."""
    order = sorted(range(len(record["prompts"])), key=lambda i: (record["rank"][i] >= config.max_rank, i))
    n_locate = min(config.locate_prompts, len(order) - 1)
    locate_idx = sorted(order[:n_locate])
    held_idx = [i for i in range(len(order)) if i not in locate_idx]
    return [record["prompts"][i] for i in locate_idx], [record["prompts"][i] for i in held_idx]


def neuron_activations(model, prompt: str, target: str, neurons: list[tuple[int, int]]) -> list[float]:
    """Activation of each neuron at the prediction position of ``prompt`` (the model's own forward)."""
    acts, _ = clean_pass(model, encode_fact(model, prompt, target))
    return [float(acts[layer, index]) for layer, index in neurons]


def fact_task(model: LoadedModel, fact, config: FindingsConfig) -> dict:
    """Assess one fact, split its prompts and locate its neurons on the locate split."""
    t0 = time.perf_counter()
    record = assess_fact(model, fact, config.max_rank, config.min_known)
    record["usable"] = bool(record["counted"] and len(record["prompts"]) >= 3)
    if record["usable"]:
        locate_p, held = split_prompts(record, config)
        res = locate_quietly(model, locate_p, fact.target, config=config.locate)
        record.update(locate_prompts=locate_p, held_prompts=held, share=res.share,
                      neurons=[[n.layer, n.index, n.score] for n in res.neurons])
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def compatible_relations(all_facts: dict, min_shared: int = 5) -> dict[str, list[str]]:
    """Relations whose subjects are of the same kind: they share at least ``min_shared`` subjects."""
    subjects = {rel: {f.subject for f in facts} for rel, facts in all_facts.items()}
    return {rel: [r2 for r2 in sorted(subjects) if r2 != rel and len(subjects[rel] & subjects[r2]) >= min_shared]
            for rel in subjects}


def _prompt_pool(all_facts: dict, compatible: dict, rec: dict, config: FindingsConfig, rng: random.Random) -> dict:
    """T2 and T3 prompts (with their targets) for one fact.

    T2: first the prompts of PARAREL facts of other relations with this subject; then the first
    prompt of a relation whose subjects are of the same kind, with this subject put in."""
    same_subject = [(p, f.target) for rel, facts in sorted(all_facts.items()) if rel != rec["relation"]
                    for f in facts if f.subject == rec["subject"] for p in f.prompts[:1]]
    for r2 in compatible.get(rec["relation"], []):
        if len(same_subject) >= config.other_prompts:
            break
        if any(f.subject == rec["subject"] for f in all_facts[r2]):
            continue  # already there
        f2 = next((f for f in all_facts[r2] if f.subject in f.prompts[0]), None)
        if f2 is not None:  # the target only places the prediction position: the fact's own will do
            same_subject.append((f2.prompts[0].replace(f2.subject, rec["subject"]), rec["target"]))
    t2 = same_subject[:config.other_prompts]
    others = [(rel, f) for rel, facts in sorted(all_facts.items()) if rel != rec["relation"] for f in facts
              if f.subject != rec["subject"]]
    t3 = [(f.prompts[rng.randrange(len(f.prompts))], f.target) for _, f in rng.sample(others, min(len(others),
                                                                                                 config.other_prompts))]
    return {"T2": t2, "T3": t3}


def activation_task(model: LoadedModel, rec: dict, pools: dict) -> dict:
    """Mean activation of the fact's neurons on each T1/T2/T3 prompt: raw (``T1_raw`` ...) and
    sign-aligned (``T1`` ...: each neuron's activation times the sign of its mean activation on
    the locate prompts, so that "activated" means moving the way it did when the fact was
    expressed; gated SiLU neurons fire with either sign, GELU neurons are positive anyway)."""
    neurons = [(layer, i) for layer, i, _ in rec["neurons"]]
    at_locate = [neuron_activations(model, p, rec["target"], neurons) for p in rec["locate_prompts"]]
    signs = [1.0 if sum(col) >= 0 else -1.0 for col in zip(*at_locate)]
    out = {"key": rec["key"], "relation": rec["relation"], "n_neurons": len(neurons), "signs": signs}
    sets = {"T1": [(p, rec["target"]) for p in rec["held_prompts"]], **pools}
    for group in GROUPS:
        acts = [neuron_activations(model, p, t, neurons) for p, t in sets[group]]
        out[f"{group}_raw"] = [sum(a) / len(a) for a in acts]
        out[group] = [sum(x * s for x, s in zip(a, signs)) / len(a) for a in acts]
        out[f"{group}_prompts"] = [p for p, _ in sets[group]]
    return out


def bootstrap_ci(values: list[float], n: int, seed: int, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and percentile bootstrap interval over ``values`` (one value per fact)."""
    if not values:
        return (math.nan, math.nan, math.nan)
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(values) for _ in values) / len(values) for _ in range(n))
    lo = means[int((1 - level) / 2 * (n - 1))]
    hi = means[int((1 + level) / 2 * (n - 1))]
    return (sum(values) / len(values), lo, hi)


def summarize_activation(rows: list[dict], n_boot: int = 1000, seed: int = 0, suffix: str = "") -> dict:
    """Per relation and overall: mean of the per-fact mean activation for T1/T2/T3 with
    bootstrap intervals, and whether T1 > T2 > T3 holds (on means and on the intervals).
    ``suffix="_raw"``: the raw activations instead of the sign-aligned ones."""
    def table(subset: list[dict]) -> dict:
        out = {"facts": len(subset)}
        for group in GROUPS:
            per_fact = [sum(r[group + suffix]) / len(r[group + suffix]) for r in subset if r[group + suffix]]
            mean, lo, hi = bootstrap_ci(per_fact, n_boot, seed)
            out[group] = {"mean": mean, "lo": lo, "hi": hi, "facts": len(per_fact)}
        m = [out[g]["mean"] for g in GROUPS]
        out["order_holds"] = bool(all(not math.isnan(x) for x in m) and m[0] > m[1] > m[2])
        out["separated"] = bool(out["order_holds"] and out["T1"]["lo"] > out["T2"]["hi"]
                                and out["T2"]["lo"] > out["T3"]["hi"])
        return out

    rels = sorted({r["relation"] for r in rows})
    return {"overall": table(rows), "per_relation": {rel: table([r for r in rows if r["relation"] == rel])
                                                     for rel in rels}}


def shared_neurons(records: list[dict]) -> dict:
    """Mean number of common knowledge neurons (and Jaccard) for pairs of facts of the same
    relation and of different relations (the paper's Table 4 analogue)."""
    sets = [(r["relation"], {(layer, i) for layer, i, _ in r["neurons"]}) for r in records if r.get("neurons")]
    intra, inter = [], []
    for (ra, a), (rb, b) in combinations(sets, 2):
        (intra if ra == rb else inter).append((len(a & b), len(a & b) / len(a | b)))

    def mean(xs, k):
        return sum(x[k] for x in xs) / len(xs) if xs else None

    return {"intra": {"pairs": len(intra), "common": mean(intra, 0), "jaccard": mean(intra, 1)},
            "inter": {"pairs": len(inter), "common": mean(inter, 0), "jaccard": mean(inter, 1)},
            "neurons_per_fact": sum(len(s) for _, s in sets) / len(sets) if sets else None}


def run_findings(model: LoadedModel, data: dict, all_facts: dict, out: str | os.PathLike, config: FindingsConfig,
                 progress: bool = True) -> dict:
    """Locate every sampled fact on its split, then measure T1/T2/T3 (resumable)."""
    out = Path(out)
    check_run(out, {**model.identity(), **asdict(config)})
    clear_stale(out)
    facts = [f for rel in sorted(data) for f in data[rel]]
    records = resumable(out, "facts", [(f.key, lambda f=f: fact_task(model, f, config)) for f in facts], "locate",
                        progress)
    usable = [r for r in records if r.get("usable") and r.get("neurons")]
    compatible = compatible_relations(all_facts)

    def measure(rec):
        rng = random.Random(f"{config.seed}-{rec['key']}")
        return activation_task(model, rec, _prompt_pool(all_facts, compatible, rec, config, rng))

    rows = resumable(out, "activation", [(r["key"], lambda r=r: measure(r)) for r in usable], "activation", progress)
    return {"records": records, "activation": rows}


def run_updates(model: LoadedModel, records: list[dict], out, config: FindingsConfig, progress: bool = True) -> list:
    """The update sweep on up to ``update_facts`` facts per relation (resumable)."""
    out = Path(out)
    usable = [r for r in records if r.get("usable") and r.get("neurons")]
    rels = sorted({r["relation"] for r in usable})
    first = lambda t: model.tokenizer(t, add_special_tokens=False)["input_ids"][:1]  # noqa: E731
    jobs = []
    for rel in rels:
        recs = [r for r in usable if r["relation"] == rel]
        for j, rec in enumerate(recs[:config.update_facts]):
            others = recs[j + 1:] + recs[:j]
            candidates = [r["target"] for r in others if first(r["target"]) != first(rec["target"])]
            if not candidates:
                continue
            # the authors' variant: share of the *other* facts of the relation that have each neuron
            shares = neuron_shares([[(layer, i) for layer, i, _ in r["neurons"]] for r in others])
            intra = others[:config.control_facts]
            inter = [r for r in usable if r["relation"] != rel][:config.control_facts]
            jobs.append((rec, candidates[0], intra, inter, shares))
    return resumable(out, "updates", [(job[0]["key"], lambda job=job: update_task(model, *job, config)) for job in jobs],
                     "update sweep", progress)


def inspect_examples(model: LoadedModel, records: list[dict], sentences: list[str], k: int = 3, top: int = 8) -> list:
    """``kn inspect`` on the ``k`` knowledge neurons found for the most facts (ties: larger mean score)."""

    counts, scores = Counter(), {}
    for r in records:
        for layer, i, score in r.get("neurons") or []:
            counts[(layer, i)] += 1
            scores.setdefault((layer, i), []).append(score)
    chosen = sorted(counts, key=lambda n: (-counts[n], -sum(scores[n]) / len(scores[n])))[:k]
    out = []
    for layer, index in chosen:
        rep = inspect_neuron(model, layer, index, corpus=sentences, top=top)
        facts = [r["key"] for r in records if any((x[0], x[1]) == (layer, index) for x in r.get("neurons") or [])]
        out.append({**rep.to_dict(model.tokenizer), "facts": facts})
    return out


def _fmt(x, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if pct:
        return f"{100 * x:.0f}%"
    return f"{x:.3g}" if abs(x) < 1e5 else f"{x:.2e}"


def write_findings_report(payload: dict, out, model_name: str, command: str) -> Path:
    """report.md: activation by knowledge-expressing prompts, shared neurons, the update sweep and
    neuron inspections, each from this run."""
    out = Path(out)
    act, shared, upd = payload["activation_summary"], payload["shared"], payload["update_summary"]
    plot_interval_groups({**act["per_relation"], "all": act["overall"]},
                         {g: f"{g}: {GROUP_NAMES[g]}" for g in GROUPS}, out / "activation.png",
                         f"{model_name}: activation of knowledge neurons", "mean activation of the fact's neurons")
    o = act["overall"]
    lines = [
        *report_header(f"The paper's remaining findings: {model_name}", "", command),
        f"{payload['sampled']} PARAREL facts sampled; {payload['usable']} are usable here (the model ranks the object in "
        f"its top {payload['config']['max_rank']} for at least half the prompts, and the fact has at least 3 prompts). "
        f"Each usable fact's neurons are located (IG, m = {payload['config']['steps']}, adaptive refinement) on up to "
        f"{payload['config']['locate_prompts']} of its prompts (known ones first); the rest are held out.",
        "",
        "## Are knowledge neurons activated by knowledge-expressing prompts?",
        "",
        "Mean activation of a fact's knowledge neurons at the prediction position, averaged per fact, then over "
        f"facts, with 95% bootstrap intervals over facts ({payload['config']['bootstrap']} resamples). "
        + "; ".join(f"{g}: {GROUP_NAMES[g]}" for g in GROUPS) + ". T2 prompts are PARAREL prompts of other "
        "relations about the same subject, or, where PARAREL has none, the first prompt of a relation whose "
        "subjects are of the same kind (sharing at least 5 subjects) with this subject put in. Activations are "
        "sign-aligned: each neuron's activation times the sign of its mean activation on the fact's locate "
        "prompts (gated SiLU neurons fire with either sign; for the paper's GELU neurons this changes nothing); "
        "the raw means are given below the table.",
        "",
        "| relation | facts | T1 | T2 | T3 | T1 > T2 > T3 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    def cell(c: dict) -> str:
        if not c["facts"]:
            return "n/a (no prompts)"
        return f"{c['mean']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}] ({c['facts']})"

    for name, t in [*act["per_relation"].items(), ("**all**", o)]:
        cells = " | ".join(cell(t[g]) for g in GROUPS)
        order = "yes, intervals apart" if t["separated"] else ("yes (means)" if t["order_holds"] else "no")
        lines.append(f"| {name} | {t['facts']} | {cells} | {order} |")
    held = sum(t["order_holds"] for t in act["per_relation"].values())
    raw = payload["activation_raw"]["overall"]
    lines += [
        "",
        "![activation of knowledge neurons](activation.png)",
        "",
        f"- Overall, T1 = {o['T1']['mean']:.3f}, T2 = {o['T2']['mean']:.3f}, T3 = {o['T3']['mean']:.3f}: the paper's "
        f"order T1 > T2 > T3 "
        + ("holds, with non-overlapping intervals" if o["separated"] else
           "holds on the means, but the intervals overlap" if o["order_holds"] else "does not hold")
        + f"; per relation it holds on the means for {held} of {len(act['per_relation'])} relations. Cells give the "
          "mean [95% interval] (facts).",
        "- Raw activations (no sign alignment), overall: "
        + ", ".join(f"{g} = {raw[g]['mean']:.3f} [{raw[g]['lo']:.3f}, {raw[g]['hi']:.3f}]" for g in GROUPS)
        + f" (order {'holds' if raw['order_holds'] else 'does not hold'}).",
        f"- Shared knowledge neurons: facts of the same relation have {_fmt(shared['intra']['common'])} neurons in "
        f"common on average (Jaccard {_fmt(shared['intra']['jaccard'])}, {shared['intra']['pairs']} pairs), facts of "
        f"different relations {_fmt(shared['inter']['common'])} (Jaccard {_fmt(shared['inter']['jaccard'])}, "
        f"{shared['inter']['pairs']} pairs); {_fmt(shared['neurons_per_fact'])} neurons per fact.",
        "",
        "## Edits that work: a sweep over the update rule",
        "",
        "Each edited fact <h, r, t> -> <h, r, t'> (t' the object of another fact of the relation); efficacy on the "
        "prompts the neurons were located on, generalization on the held-out paraphrases, specificity on up to "
        f"{payload['config']['control_facts']} other usable facts of the same relation (intra) and of other relations "
        "(inter): their top prediction unchanged. Perplexity of those control facts (per fact, on their object), "
        "pooled over all edits: median, geometric mean and the paper's mean.",
        "",
        "| variant | facts | lambda2 (median) | efficacy | P(t') before -> after | generalization | intra unchanged "
        "| inter unchanged | control ppl median | geometric | mean | median ratio after/before |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in VARIANTS:
        s = upd[v]
        b, a = s["ppl_before"], s["ppl_after"]
        skipped = f" ({s['skipped']} skipped)" if s["skipped"] else ""
        lines.append(
            f"| {v} | {s['facts']}{skipped} "
            f"| {_fmt(s['lambda2']['median'])} | {_fmt(s['efficacy'], True)} | {_fmt(s['p_new_before'])} -> "
            f"{_fmt(s['p_new_after'])} | {_fmt(s['generalization'], True)} | {_fmt(s['intra_unchanged'], True)} | "
            f"{_fmt(s['inter_unchanged'], True)} | {_fmt(b['median'])} -> {_fmt(a['median'])} | {_fmt(b['geometric'])} "
            f"-> {_fmt(a['geometric'])} | {_fmt(b['mean'])} -> {_fmt(a['mean'])} | x{_fmt(s['ppl_ratio']['median'])} |")
    default, why = payload["update_default"]
    cal = upd["calibrated"]
    lines += [
        "",
        f"- Recommended variant on this model: **{default}** ({why}).",
        f"- The calibrated variant reached t' on top of every locate prompt for {_fmt(cal['reached'], True)} of the "
        "facts within the lambda2 ladder "
        f"{', '.join(str(x) for x in payload['config']['lambda2_ladder'])}.",
        "",
        "## Inspecting knowledge neurons",
        "",
        "`kn inspect` on the neurons found for the most facts: the tokens their value slot promotes and suppresses "
        "through the unembedding, and the top-activating complete PARAREL sentences (activating token in [[...]]).",
        "",
    ]
    for ex in payload["inspect"]:
        lines += [
            f"### Layer {ex['layer']}, neuron {ex['index']} (in {len(ex['facts'])} facts' sets: "
            f"{', '.join(ex['facts'][:6])}{' ...' if len(ex['facts']) > 6 else ''})",
            "",
            "- promotes: " + ", ".join(f"`{t!r}`" for t, _ in ex["promoted"]),
            "- suppresses: " + ", ".join(f"`{t!r}`" for t, _ in ex["suppressed"]),
            "",
            "| activation | sentence |",
            "| --- | --- |",
            *[f"| {row['activation']:.3f} | {row['marked']} |" for row in ex["top_sentences"]],
            "",
        ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
