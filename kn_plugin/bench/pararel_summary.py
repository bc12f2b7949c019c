"""Tables of ``kn bench pararel`` from its records alone (no model needed): the paper's numbers
under the released code's definitions, each with a 95% bootstrap interval clustered by
relation, paired tests for every order stated, and a verdict against the paper.

``kn bench pararel-report DIR [DIR ...]`` rewrites every report from the committed records.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from kn_plugin import paper
from kn_plugin.bench.common import num, pct, rate, report_header
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.files import write_text_atomic
from kn_plugin.runs import read_json, read_stages
from kn_plugin.stats import cluster_interval, order_verdict, paired_test, sign_verdict

PAPER = {  # Dai et al. (2021), BERT-base-cased on PARAREL
    "suppress": -0.2903, "amplify": 0.3117, "base_suppress": -0.015, "base_amplify": -0.013,
    "kn_per_fact": 4.13, "update_change": 0.485, "update_success": 0.344,
    "erase": {"P19": (1450.0, 2996.0), "P106": (2279.0, 5202.0)},
}
SPLITS = ("all", "in_sample", "held_out")
GROUPS = ("kn", "base", "random")


def load_run(folder: str | Path) -> dict:
    """The run in ``folder``: its manifest (``results.json``) with every record it names,
    each checked against the content hash the manifest holds for it."""
    folder = Path(folder)
    data = read_json(folder / "results.json") if (folder / "results.json").is_file() else None
    if not isinstance(data, dict) or data.get("protocol") != "paper":
        raise KnowledgeNeuronError(f"{folder} holds no results of `kn bench pararel` (no results.json with "
                                   "the paper protocol)")
    stages = read_stages(folder, data["records"], "`kn bench pararel`")
    facts = stages.get("facts", {})
    data["facts"] = {rel: [facts[k] for k in keys] for rel, keys in data["relations"].items()}
    data["effects"] = list(stages.get("effects", {}).values())
    data["updates"] = list(stages.get("updates", {}).values())
    data["erases"] = list(stages.get("erase", {}).values())
    data["unrelated"] = list(stages.get("unrelated", {}).values())
    return data


def _split(eff: dict, split: str) -> dict:
    """The effect record restricted to its in-sample (locate) or held-out prompts."""
    n = len(eff["before"])
    keep = (range(n) if split == "all" else eff["locate"] if split == "in_sample"
            else [i for i in range(n) if i not in set(eff["locate"])])
    out = {"key": eff["key"], "relation": eff["relation"]}
    for k in ["before"] + [f"{g}_{op}" for g in GROUPS for op in ("suppress", "amplify")]:
        out[k] = [eff[k][i] for i in keep]
    return out


def _interval(rows: list[dict], stat, seed: int) -> dict:
    return cluster_interval(rows, [r["relation"] for r in rows], stat, seed=seed)


def _fact_changes(rows: list[dict], after: str) -> list[float | None]:
    return [paper.ratio_of_means(r["before"], r[after]) for r in rows]


def _paired(rows: list[dict], a: str, b: str) -> dict:
    x, y = _fact_changes(rows, a), _fact_changes(rows, b)
    pairs = [(u, v) for u, v in zip(x, y) if u is not None and v is not None]
    return paired_test([u for u, _ in pairs], [v for _, v in pairs])


def summarize(run: dict, seed: int = 0) -> dict:
    """Every headline number of the run, from its records."""
    effects = run["effects"]
    facts = [r for recs in run["facts"].values() for r in recs]
    counted = [r for r in facts if r["counted"]]
    out = {"sampled": len(facts), "counted": len(counted), "located": len(effects),
           "relations": sorted({r["relation"] for r in effects})}
    for split in SPLITS:
        rows = [_split(e, split) for e in effects]
        rows = [r for r in rows if r["before"]]
        s = {"facts": len(rows)}
        for g in GROUPS:
            for op in ("suppress", "amplify"):
                after = f"{g}_{op}"
                s[after] = _interval(rows, lambda u, a=after: paper.relation_mean(u, "before", a), seed)
                s[f"{after}_pooled"] = paper.pooled(rows, "before", after)
                s[f"{after}_median"] = paper.prompt_median(rows, "before", after)
        for op in ("suppress", "amplify"):
            s[f"kn_vs_base_{op}"] = _paired(rows, f"kn_{op}", f"base_{op}")
            s[f"kn_vs_random_{op}"] = _paired(rows, f"kn_{op}", f"random_{op}")
        s["per_relation"] = {op: paper.per_relation(rows, "before", f"kn_{op}") for op in ("suppress", "amplify")}
        out[split] = s
    # held-out against in-sample, fact by fact
    ins, held = [_split(e, "in_sample") for e in effects], [_split(e, "held_out") for e in effects]
    for op in ("suppress", "amplify"):
        pairs = [(paper.ratio_of_means(a["before"], a[f"kn_{op}"]), paper.ratio_of_means(b["before"], b[f"kn_{op}"]))
                 for a, b in zip(ins, held) if b["before"]]
        pairs = [p for p in pairs if None not in p]
        out[f"held_vs_in_{op}"] = paired_test([b for _, b in pairs], [a for a, _ in pairs])
    unrel = [u for u in run["unrelated"] if u["before"]]
    out["unrelated"] = {op: _interval(unrel, lambda u, o=op: paper.relation_mean(u, "before", o), seed)
                        for op in ("suppress", "amplify")}
    located = [{"relation": r["relation"], "n": len(run["refined"]["sets"].get(r["key"], {}).get("kn", []))}
               for r in counted if r.get("ig_coarse") is not None]
    mean_n = lambda u: sum(x["n"] for x in u) / len(u) if u else None  # noqa: E731
    out["kn_per_fact"] = _interval(located, mean_n, seed)
    out["kn_in_range"] = (sum(2 <= x["n"] <= 5 for x in located) / len(located)) if located else None
    out["empty_sets"] = sum(x["n"] == 0 for x in located)
    out["shares"] = {rel: v for rel, v in run["refined"]["relations"].items()}
    out["update"] = _summarize_updates(run["updates"], seed)
    out["erase"] = [_summarize_erase(e, seed) for e in run["erases"]]
    gaps = [g for r in counted for g in r.get("max_gap", [])]
    steps = [s for r in counted for s in r.get("steps_used", [])]
    out["max_gap_median"] = sorted(gaps)[len(gaps) // 2] if gaps else None
    out["steps_used"] = {"min": min(steps), "max": max(steps), "mean": sum(steps) / len(steps)} if steps else None
    out["seconds"] = round(sum(r.get("seconds", 0.0) for r in facts) + sum(e.get("seconds", 0.0) for e in effects), 1)
    return out


def _summarize_updates(updates: list[dict], seed: int) -> dict:
    ups = [u for u in updates if u.get("change") is not None]
    mean = lambda k: (lambda u: sum(x[k] for x in u) / len(u) if u else None)  # noqa: E731
    ppl = lambda side, when: (lambda u: math.exp(sum(sum(x[when][side]) / len(x[when][side])  # noqa: E731
                                                     for x in u if x[when][side]) / max(1, len(u))))
    out = {"edits": len(ups), "prompts": sum(u["prompts"] for u in ups)}
    if not ups:
        return out
    out["change"] = _interval(ups, mean("change"), seed)
    out["success"] = _interval(ups, mean("success"), seed)
    for side in ("intra_log_ppl", "inter_log_ppl"):
        name = side.split("_")[0]
        out[f"{name}_ppl_before"] = ppl(side, "before")(ups)
        out[f"{name}_ppl_after"] = ppl(side, "after")(ups)
        rise = [{"relation": u["relation"], "d": sum(u["after"][side]) / len(u["after"][side])
                 - sum(u["before"][side]) / len(u["before"][side])} for u in ups if u["before"][side]]
        out[f"{name}_log_ppl_rise"] = _interval(rise, lambda v: sum(x["d"] for x in v) / len(v) if v else None, seed)
        if rise:
            out[f"{name}_log_ppl_rise_median"] = statistics.median(x["d"] for x in rise)
            out[f"{name}_ppl_x10"] = [sum(x["d"] >= math.log(10) for x in rise), len(rise)]
    return out


def _summarize_erase(e: dict, seed: int) -> dict:
    out = {"relation": e["relation"], "neurons": len(e["neurons"]), "facts": len(e["facts"])}
    for side in ("relation", "other"):
        b, a = e["before"][side], e["after"][side]
        if not b["log_ppl"]:
            continue
        out[f"{side}_ppl"] = (math.exp(sum(b["log_ppl"]) / len(b["log_ppl"])),
                              math.exp(sum(a["log_ppl"]) / len(a["log_ppl"])))
        out[f"{side}_accuracy"] = (sum(b["correct"]) / len(b["correct"]), sum(a["correct"]) / len(a["correct"]))
        d = [{"relation": i, "d": y - x} for i, (x, y) in enumerate(zip(b["log_ppl"], a["log_ppl"]))]
        out[f"{side}_log_ppl_rise"] = cluster_interval(d, [x["relation"] for x in d],
                                                       lambda v: sum(x["d"] for x in v) / len(v) if v else None,
                                                       seed=seed)
    return out


# --- report ---------------------------------------------------------------------------------

def with_ci(iv: dict, fmt=pct) -> str:
    if iv.get("value") is None:
        return "n/a"
    if iv.get("low") is None:
        return f"{fmt(iv['value'])} (no interval)"
    return f"{fmt(iv['value'])} [{fmt(iv['low'])}, {fmt(iv['high'])}]"


def inside(iv: dict, value: float) -> str:
    """Descriptive rows (a size, a rate): "holds" when the paper's value lies inside our interval,
    otherwise which side of it our interval lies on."""
    if iv.get("low") is None:
        return "cannot tell"
    if iv["low"] <= value <= iv["high"]:
        return "holds"
    return "higher than the paper" if iv["low"] > value else "lower than the paper"


def _ppl_cell(u: dict, side: str) -> str:
    """Perplexity before -> after (geometric mean over edits), the mean log-perplexity rise with
    its interval, its median, and how many edits multiply the perplexity by 10 or more."""
    cell = f"{num(u[f'{side}_ppl_before'])} -> {num(u[f'{side}_ppl_after'])}"
    if f"{side}_ppl_x10" not in u:
        return cell
    x10, edits = u[f"{side}_ppl_x10"]
    return (f"{cell}; log-ppl rise {with_ci(u[f'{side}_log_ppl_rise'], num)}, median "
            f"{num(u[f'{side}_log_ppl_rise_median'])}; x10 or more after {x10} of {edits} edits")


def test_cell(t: dict) -> str:
    if t.get("sign_p") is None:
        return "n/a"
    w = "n/a" if t["wilcoxon_p"] is None else f"{t['wilcoxon_p']:.2g}"
    return f"{t['greater']} > / {t['less']} < of {t['n']} facts; Wilcoxon p = {w}, sign p = {t['sign_p']:.2g}"


def paper_rows(s: dict, split: str = "held_out") -> list[tuple[str, str, str, str]]:
    """(claim, ours with interval, paper, verdict) for the side-by-side table."""
    h, u = s[split], s["update"]
    rows = [
        ("suppressing knowledge neurons lowers P(correct)", with_ci(h["kn_suppress"]), pct(PAPER["suppress"]),
         sign_verdict(h["kn_suppress"], "negative")),
        ("amplifying them raises P(correct)", with_ci(h["kn_amplify"]), pct(PAPER["amplify"]),
         sign_verdict(h["kn_amplify"], "positive")),
        ("baseline (activation-selected neurons), suppress", with_ci(h["base_suppress"]),
         f"about {pct(PAPER['base_suppress'])}", "n/a"),
        ("baseline, amplify", with_ci(h["base_amplify"]), f"about {pct(PAPER['base_amplify'])}", "n/a"),
        ("suppress: knowledge neurons lower P more than the baseline (paired)", test_cell(h["kn_vs_base_suppress"]),
         "yes", order_verdict(h["kn_vs_base_suppress"], "less")),
        ("amplify: knowledge neurons raise P more than the baseline (paired)", test_cell(h["kn_vs_base_amplify"]),
         "yes", order_verdict(h["kn_vs_base_amplify"], "greater")),
        ("random neurons (same layers and sizes), suppress", with_ci(h["random_suppress"]), "n/a", "n/a"),
        ("suppress: knowledge neurons lower P more than random neurons (paired)",
         test_cell(h["kn_vs_random_suppress"]), "n/a", order_verdict(h["kn_vs_random_suppress"], "less")),
        ("unrelated fact of another relation, suppress (all its prompts)", with_ci(s["unrelated"]["suppress"]),
         "n/a", "n/a"),
        ("knowledge neurons per fact", with_ci(s["kn_per_fact"], num), num(PAPER["kn_per_fact"]),
         inside(s["kn_per_fact"], PAPER["kn_per_fact"])),
    ]
    if u.get("edits"):
        rows += [
            (f"update: change rate ({u['edits']} edits, prompts answered right before)", with_ci(u["change"], rate),
             rate(PAPER["update_change"]), inside(u["change"], PAPER["update_change"])),
            ("update: success rate", with_ci(u["success"], rate), rate(PAPER["update_success"]),
             inside(u["success"], PAPER["update_success"])),
            ("update: intra-relation perplexity (controls without t')", _ppl_cell(u, "intra"), "small increase",
             "n/a"),
            ("update: inter-relation perplexity", _ppl_cell(u, "inter"), "small increase", "n/a"),
        ]
    else:
        rows.append(("update: change and success rates", "no edit: the released code's rule leaves a fact no neuron "
                     "until its relation has 20 or more located facts (a neuron counts 1 + the bags holding it, "
                     "against 10% of the bags)", f"{rate(PAPER['update_change'])} / {rate(PAPER['update_success'])}",
                     "cannot tell"))
    for e in s["erase"]:
        if "relation_ppl" not in e:
            continue
        ref = PAPER["erase"].get(e["relation"])
        rows.append((f"erase {e['relation']} ({e['neurons']} neurons): its perplexity rises",
                     f"{num(e['relation_ppl'][0])} -> {num(e['relation_ppl'][1])}; log-ppl rise "
                     f"{with_ci(e['relation_log_ppl_rise'], num)}",
                     f"{ref[0]:.0f} -> {ref[1]:.0f}" if ref else "n/a",
                     sign_verdict(e["relation_log_ppl_rise"], "positive")))
        if "other_ppl" in e:
            rows.append((f"erase {e['relation']}: other relations' perplexity",
                         f"{num(e['other_ppl'][0])} -> {num(e['other_ppl'][1])}; log-ppl rise "
                         f"{with_ci(e['other_log_ppl_rise'], num)}", "small change", "n/a"))
    return rows


DEPARTURES = [
    "Facts: only those the model knows count (object's first token in the top `max_rank` on at least "
    "`min_known` of the prompts) and only single-token objects; the released code runs every PARAREL fact "
    "(BERT-base knows most of them, a small causal model does not).",
    "Prompts: causal models can use only templates whose object comes last; a fact needs `locate_prompts + 1` "
    "of them, so relations with fewer usable templates are left out.",
    "Held out: neurons are located on `locate_prompts` prompts per fact (drawn with the seed) and the headline "
    "is measured on the fact's *other* prompts; the released code measures on the prompts it located on "
    "(in-sample, reported beside it).",
    "With 3 locate prompts the floor of 3 sharing prompts makes every p <= 1 keep the same set (the "
    "intersection of the 3 coarse sets): the relation-level p tuning runs, but only matters with more locate prompts.",
    "Integration: the paper's right Riemann sum (alpha = k/m, k = 1..m); the released code sums alpha = "
    "k/m for k = 0..m-1 (left). Both converge to the same integral; see the convergence table.",
    "Random neurons (same layers, same count) and the unrelated fact are measured beside the paper's "
    "activation baseline; the unrelated fact is one counted fact of another relation, all its prompts.",
    "Update: gated (SiLU/GELU-tanh) neurons fire with either sign, so each slot's update is oriented by "
    "the sign of the neuron's activation on the fact's prompts (the released code assumes positive); "
    "measured on every prompt the model answers correctly, not on one random prompt; intra-relation "
    "controls never include a fact whose object is the new target.",
    "Erase: as the released code (the 20 neurons most common among the relation's refined sets, value "
    "slots zeroed), not the paper's text ([UNK] embedding); other relations: a seeded sample of counted facts.",
]


def write_report(folder: str | Path, s: dict | None = None) -> Path:
    """``folder/report.md`` from the run's records."""
    folder = Path(folder)
    run = load_run(folder)
    s = s or summarize(run)
    c, model = run["config"], run["model"]
    lines = [*report_header(f"The paper's protocol on PARAREL: {model}",
                            "Dai et al. (2021) as the authors' released code runs it, held out, with 95% "
                            "bootstrap intervals clustered by relation.", run["command"]),
             "Tables recomputed from the records in this folder (no model needed):", "", "```bash",
             f"kn bench pararel-report {folder.as_posix()}", "```", "",
             "## Setup", "",
             f"- {s['sampled']} facts drawn from {len(run['facts'])} relations; {s['counted']} counted, "
             f"{s['located']} with knowledge neurons, in {len(s['relations'])} relations.",
             f"- IG of P(object) at m = {c['steps']} ({c['grid']}), engine {c['engine']}; coarse >= "
             f"{c['threshold']} x max; activation baseline >= {c['base_threshold']} x max activation; refined: "
             f"in >= max(p x k, {c['min_sharing']}) of the k = {c['locate_prompts']} locate prompts, p tuned per "
             f"relation from {c['share']}.",
             f"- Interventions at the prediction position; random control: {c['random_draws']} draws.",
             f"- Update: lambda1 = {c['lambda1']}, lambda2 = {c['lambda2']} (norm-scaled, the released code), "
             f"up to {c['update_facts']} edits per relation, {c['controls']} control facts each side.",
             f"- Attribution and interventions: {s['seconds']:.0f} s in all.", "",
             "## Next to the paper (held-out prompts)", "",
             "Relative change = per relation the ratio of mean probabilities, averaged over relations.", "",
             "| claim | this model [95% CI] | paper (BERT-base) | verdict |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {p} | {v} |" for a, b, p, v in paper_rows(s)]
    lines += ["", "## In-sample, held-out, pooled", "",
              "| measure | in-sample (locate prompts) | held-out | all prompts |", "| --- | --- | --- | --- |"]
    for g in GROUPS:
        for op in ("suppress", "amplify"):
            k = f"{g}_{op}"
            lines.append(f"| {g} {op}: mean over relations | " + " | ".join(with_ci(s[sp][k]) for sp in
                                                                             ("in_sample", "held_out", "all")) + " |")
            lines.append(f"| {g} {op}: pooled over prompts | " + " | ".join(pct(s[sp][f'{k}_pooled']) for sp in
                                                                             ("in_sample", "held_out", "all")) + " |")
            lines.append(f"| {g} {op}: median over prompts | " + " | ".join(pct(s[sp][f'{k}_median']) for sp in
                                                                             ("in_sample", "held_out", "all")) + " |")
    lines += ["", "Held-out against in-sample, fact by fact (relative change of each fact's mean probability):", ""]
    for op in ("suppress", "amplify"):
        lines.append(f"- {op}: {test_cell(s[f'held_vs_in_{op}'])} (greater = held-out change larger)")
    lines += ["", "## Refinement", "",
              f"- Knowledge neurons per located fact: {with_ci(s['kn_per_fact'], num)} (paper 4.13); "
              f"{rate(s['kn_in_range'])} of facts keep 2-5; {s['empty_sets']} counted facts keep none.",
              f"- Median completeness gap (max over layers of |gap| / (|layer effect| + 1e-4)): "
              f"{num(s['max_gap_median'])}; steps used {s['steps_used']}.", "",
              "| relation | p (IG) | mean set | p (baseline) | mean set | suppress (held-out) | amplify |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    pr = s["held_out"]["per_relation"]
    for rel, v in sorted(s["shares"].items()):
        lines.append(f"| {rel} | {v['kn']['share']:.2f} | {v['kn']['mean_size']:.2f} | {v['base']['share']:.2f} | "
                     f"{v['base']['mean_size']:.2f} | {pct(pr['suppress'].get(rel))} | {pct(pr['amplify'].get(rel))} |")
    lines += ["", "## Where this departs from the released code", ""] + [f"- {d}" for d in DEPARTURES]
    path = folder / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def write_summary(folder: str | Path) -> dict:
    """``folder/summary.json`` and ``report.md`` from the records; returns the summary."""
    folder = Path(folder)
    s = summarize(load_run(folder))
    write_text_atomic(folder / "summary.json", json.dumps(s, indent=1))
    write_report(folder, s)
    return s
