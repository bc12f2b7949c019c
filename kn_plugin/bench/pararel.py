"""``kn bench pararel``: the paper's experiments on PARAREL (resumable)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kn_plugin.bench.common import (
    assess_fact,
    check_run,
    clear_stale,
    intervention_record,
    read_json,
    report_header,
    write_atomic,
)
from kn_plugin.models import LoadedModel

logger = logging.getLogger(__name__)


PAPER = {  # Dai et al. (2021), BERT-base on PARAREL
    "suppress": -0.2903, "amplify": 0.3117, "random_suppress": -0.015, "random_amplify": -0.013,
    "update_change_rate": 0.485, "update_success_rate": 0.344,
    "erase": {"P19": (1450.0, 2996.0), "P106": (2279.0, 5202.0)},
}


@dataclass(frozen=True)
class ParaRelConfig:
    """Checked settings of ``kn bench pararel``."""

    steps: int = 20
    batch_size: int = 10
    max_rank: int = 10  # a prompt "knows" the fact when the first target token ranks below this
    min_known: float = 0.5  # a fact counts when that holds for at least this share of prompts
    update_facts: int = 10
    lambda1: float = 1.0
    lambda2: float = 8.0
    erase_relations: tuple[str, ...] = ("P19", "P27", "P106", "P937")
    erase_min_facts: int = 5
    random_draws: int = 5
    seed: int = 0
    engine: str = "fast"

    def __post_init__(self):
        from kn_plugin.attribution import get_engine
        from kn_plugin.errors import KnowledgeNeuronError

        get_engine(self.engine)  # clear error for an unknown engine
        if self.steps < 1 or self.batch_size < 1 or self.max_rank < 1 or self.random_draws < 1:
            raise KnowledgeNeuronError("steps, batch size, max rank and random draws must be >= 1")
        if not 0 < self.min_known <= 1:
            raise KnowledgeNeuronError(f"min_known must be in (0, 1], got {self.min_known}")
        if self.update_facts < 0 or self.erase_min_facts < 1:
            raise KnowledgeNeuronError("update facts must be >= 0 and erase min facts >= 1")


def fact_task(model: LoadedModel, fact, unrelated, config: ParaRelConfig) -> dict:
    """Assess, locate and intervene on one PARAREL fact (in this process or a Ray worker)."""
    from kn_plugin.refinement import locate_quietly

    t0 = time.perf_counter()
    record = assess_fact(model, fact, config.max_rank, config.min_known)
    if record["counted"]:
        res = locate_quietly(model, record["prompts"], fact.target, steps=config.steps, adaptive=True,
                             batch_size=config.batch_size, engine=config.engine, progress=False)
        neurons = [(n.layer, n.index) for n in res.neurons]
        record["neurons"] = [[n.layer, n.index, n.score] for n in res.neurons]
        record["share"] = res.share
        if neurons:
            record.update(intervention_record(model, record["prompts"], fact.target, record["prob"], neurons,
                                              unrelated, config.seed, config.random_draws))
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def update_task(model, fact_rec: dict, new_target: str, intra: list[dict], inter: list[dict],
                config: ParaRelConfig) -> dict:
    """Update one counted fact to ``new_target``, measure, undo."""
    from kn_plugin.assess import encode_fact
    from kn_plugin.editing import update_fact
    from kn_plugin.evaluation import update_effect

    enc = lambda recs, tgt=None: [encode_fact(model, r["prompts"][0], tgt or r["target"])  # noqa: E731
                                  for r in recs]
    neurons = [(layer, i) for layer, i, _ in fact_rec["neurons"]]
    edit = update_fact(model, neurons, fact_rec["target"], new_target, lambda1=config.lambda1,
                       lambda2=config.lambda2, prompts=fact_rec["prompts"])
    facts = [encode_fact(model, p, fact_rec["target"]) for p in fact_rec["prompts"]]
    new_facts = [encode_fact(model, p, new_target) for p in fact_rec["prompts"]]
    eff = update_effect(model, edit, facts, new_facts, intra=enc(intra), inter=enc(inter))
    return {"key": fact_rec["key"], "relation": fact_rec["relation"], "old": fact_rec["target"],
            "new": new_target, "n_slots": len(edit.slots), **eff}


def erase_task(model, relation: str, recs: list[dict], others: list[dict], config: ParaRelConfig) -> dict:
    """Erase one relation's shared neurons, measure, undo."""
    from kn_plugin.assess import encode_fact
    from kn_plugin.editing import erase_relation
    from kn_plugin.evaluation import erase_effect

    counted = [r for r in recs if r.get("counted") and r.get("neurons")]
    if len(counted) < config.erase_min_facts:
        return {"relation": relation, "skipped": True,
                "reason": f"only {len(counted)} facts with knowledge neurons "
                          f"(< m = {config.erase_min_facts})"}
    sets = [[(layer, i) for layer, i, _ in r["neurons"]] for r in counted]
    edit = erase_relation(model, sets, min_facts=config.erase_min_facts)
    rel = [encode_fact(model, p, r["target"]) for r in counted for p in r["prompts"]]
    oth = [encode_fact(model, r["prompts"][0], r["target"]) for r in others]
    return {"relation": relation, "skipped": False, "n_facts": len(counted),
            "erased": [list(s) for s in edit.slots], "replacement": edit.meta["replacement"],
            **erase_effect(model, edit, rel, oth)}


def run_pararel(model: LoadedModel, data: dict, out: str | os.PathLike, config: ParaRelConfig,
                progress: bool = True, pool=None) -> dict:
    """Run (or resume) the PARAREL experiments; each result file is written atomically as soon
    as it is finished, and a rerun skips what is already there.

    ``pool``: a started :class:`~kn_plugin.distributed.RayPool`; facts, updates and erasures
    then run as tasks on its workers (the same functions as here) and the driver writes them."""
    from tqdm.auto import tqdm

    from kn_plugin.distributed import run_tasks

    out = Path(out)
    check_run(out, {"model": model.fingerprint, **asdict(config)})
    clear_stale(out)

    def stage(task: str, folder: str, jobs: list[tuple[str, tuple]], desc: str) -> dict[str, dict]:
        done = {key: read_json(out / folder / f"{key}.json") for key, _ in jobs}
        todo = [(key, payload) for key, payload in jobs if done[key] is None]
        with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit=desc.rstrip("s"),
                  disable=not progress or not jobs) as bar:
            for key, rec in run_tasks(model, task, todo, pool):
                write_atomic(out / folder / f"{key}.json", rec)
                done[key] = rec
                bar.update(1)
        return done

    rels = sorted(data)
    jobs = []
    for k, rel in enumerate(rels):
        other_rel = data[rels[(k + 1) % len(rels)]]
        jobs += [(fact.key, (fact, other_rel[i % len(other_rel)], config)) for i, fact in enumerate(data[rel])]
    done = stage("pararel_fact", "facts", jobs, "facts")
    records = {rel: [done[fact.key] for fact in data[rel]] for rel in rels}

    counted = {rel: [r for r in recs if r["counted"] and r.get("neurons")]
               for rel, recs in records.items()}
    first_token = lambda t: model.tokenizer(t, add_special_tokens=False)["input_ids"][:1]  # noqa: E731
    jobs = []
    for rel in rels:
        recs = counted[rel]
        for j in range(min(config.update_facts, len(recs))):
            candidates = [r["target"] for r in recs[j + 1:] + recs[:j]
                          if first_token(r["target"]) != first_token(recs[j]["target"])]
            if not candidates:
                continue
            intra = [r for r in recs if r is not recs[j]][:10]
            inter = [r for o in rels if o != rel for r in counted[o]][:10]
            jobs.append((recs[j]["key"], (recs[j], candidates[0], intra, inter, config)))
    done = stage("pararel_update", "updates", jobs, "updates")
    updates = [done[key] for key, _ in jobs]

    jobs = []
    for rel in [r for r in config.erase_relations if r in records]:
        others = [r for o in rels if o != rel for r in counted[o]][:20]
        jobs.append((rel, (rel, records[rel], others, config)))
    done = stage("pararel_erase", "erase", jobs, "erasures")
    erases = [done[key] for key, _ in jobs]
    return {"records": records, "updates": updates, "erases": erases}


def _ratio(pairs: list[tuple[list[float], list[float]]]) -> float | None:
    from kn_plugin.evaluation import relative_change

    before = [x for b, _ in pairs for x in b]
    after = [x for _, a in pairs for x in a]
    return relative_change(before, after) if before else None


def summarize_pararel(run: dict, n_layers: int) -> dict:
    """Aggregate per-fact records into the paper's tables (ratios of means over prompts)."""
    def effects(recs: list[dict]) -> dict:
        recs = [r for r in recs if "suppress" in r]
        out = {"facts": len(recs)}
        for name in ("suppress", "amplify"):
            out[name] = _ratio([(r[name]["before"], r[name]["after"]) for r in recs])
            out[f"random_{name}"] = _ratio([(r[name]["before"], r[name]["random_after"]) for r in recs])
            out[f"unrelated_{name}"] = _ratio([(r[name]["unrelated_before"], r[name]["unrelated_after"])
                                               for r in recs])
        return out

    records = run["records"]
    all_recs = [r for recs in records.values() for r in recs]
    per_relation = {}
    for rel, recs in records.items():
        counted = [r for r in recs if r["counted"]]
        per_relation[rel] = {
            "sampled": len(recs), "counted": len(counted),
            "mean_prob": sum(sum(r["prob"]) / len(r["prob"]) for r in recs if r["prob"]) / max(1, len(recs)),
            "neurons_per_fact": (sum(len(r.get("neurons", [])) for r in counted) / len(counted)
                                 if counted else None),
            **effects(recs),
        }
    layer_counts = [0] * n_layers
    for r in all_recs:
        for layer, _, _ in r.get("neurons", []):
            layer_counts[layer] += 1
    updates = run["updates"]
    erases = run["erases"]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {
        "sampled": len(all_recs), "counted": sum(r["counted"] for r in all_recs),
        "overall": effects(all_recs), "per_relation": per_relation,
        "layer_counts": layer_counts,
        "neurons_per_fact": [len(r.get("neurons", [])) for r in all_recs if r["counted"]],
        "update": {
            "facts": len(updates),
            "change_rate": mean([u["change_rate"] for u in updates]),
            "success_rate": mean([u["success_rate"] for u in updates]),
            "intra_ppl_before": mean([u["before"]["intra_ppl"] for u in updates]),
            "intra_ppl_after": mean([u["after"]["intra_ppl"] for u in updates]),
            "inter_ppl_before": mean([u["before"]["inter_ppl"] for u in updates]),
            "inter_ppl_after": mean([u["after"]["inter_ppl"] for u in updates]),
            "p_new_before": mean([mean(u["before"]["new"]) for u in updates]),
            "p_new_after": mean([mean(u["after"]["new"]) for u in updates]),
        },
        "erase": erases,
        "seconds": round(sum(r.get("seconds", 0.0) for r in all_recs), 1),
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f}%"


def _rate(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3g}" if abs(x) < 1e5 else f"{x:.2e}"


def write_pararel_report(summary: dict, out: str | os.PathLike, model_name: str, command: str,
                         config: ParaRelConfig) -> Path:
    """``report.md`` beside three plots, with the paper's BERT-base numbers side by side."""
    from kn_plugin.plotting import plot_histogram, plot_layer_distribution, plot_relation_bars

    out = Path(out)
    plot_layer_distribution(summary["layer_counts"], out / "layer_distribution.png",
                            f"{model_name}: knowledge neurons per layer")
    rows = {rel: v for rel, v in summary["per_relation"].items() if v["facts"]}
    if rows:
        plot_relation_bars(rows, out / "relations.png",
                           f"{model_name}: suppressing / amplifying knowledge neurons")
    plot_histogram(summary["neurons_per_fact"], out / "neurons_per_fact.png",
                   f"{model_name}: refined neurons per fact", "knowledge neurons")
    o, u = summary["overall"], summary["update"]
    lines = [
        *report_header(f"Knowledge neurons on PARAREL: {model_name}",
                       "Reproduces the experiments of Dai et al. (2021) with kn_plugin.", command),
        "## Setup",
        "",
        f"- {summary['sampled']} facts sampled; {summary['counted']} **count**: the first target "
        f"token ranks in the model's top {config.max_rank} for at least {config.min_known:.0%} of "
        "the fact's prompts (the paper's BERT answers most PARAREL facts; a small causal model "
        "does not, and attributing facts it does not know would measure noise).",
        f"- Prompts: every PARAREL template whose `[Y]` comes last (causal models), target = \" \" + "
        f"object; multi-token objects scored by teacher forcing. IG with m = {config.steps}, "
        "coarse t = 0.2, refined p = 0.7 tuned by 0.05 until 2-5 neurons remain.",
        f"- Interventions at the prediction position; random control: same number of neurons per "
        f"layer, averaged over {config.random_draws} draws; unrelated control: the same neurons on "
        "a fact of another relation. Changes are ratios of means over all prompts.",
        f"- Update: lambda1 = {config.lambda1}, lambda2 = {config.lambda2}, oriented by the sign of "
        "each neuron's activation; new target = object of another fact of the relation.",
        f"- Erase: neurons shared by >= {config.erase_min_facts} counted facts of the relation, value "
        "slots set to the unknown-token embedding.",
        f"- Attribution and interventions took {summary['seconds']:.0f} s in total.",
        "",
        "## Main results next to the paper",
        "",
        f"| | {model_name} | paper (BERT-base) |",
        "| --- | --- | --- |",
        f"| suppress knowledge neurons | {_pct(o['suppress'])} | {_pct(PAPER['suppress'])} |",
        f"| amplify knowledge neurons | {_pct(o['amplify'])} | {_pct(PAPER['amplify'])} |",
        f"| suppress random neurons | {_pct(o['random_suppress'])} | about {_pct(PAPER['random_suppress'])} |",
        f"| amplify random neurons | {_pct(o['random_amplify'])} | about {_pct(PAPER['random_amplify'])} |",
        f"| suppress, unrelated fact | {_pct(o['unrelated_suppress'])} | n/a |",
        f"| amplify, unrelated fact | {_pct(o['unrelated_amplify'])} | n/a |",
        f"| update: change rate ({u['facts']} facts) | {_rate(u['change_rate'])} | 48.5% |",
        f"| update: success rate | {_rate(u['success_rate'])} | 34.4% |",
        f"| update: intra-relation perplexity | {_num(u['intra_ppl_before'])} -> {_num(u['intra_ppl_after'])} | small increase |",
        f"| update: inter-relation perplexity | {_num(u['inter_ppl_before'])} -> {_num(u['inter_ppl_after'])} | small increase |",
    ]
    for e in summary["erase"]:
        paper = PAPER["erase"].get(e["relation"])
        paper_s = f"{paper[0]:.0f} -> {paper[1]:.0f}" if paper else "n/a"
        if e["skipped"]:
            lines.append(f"| erase {e['relation']}: perplexity | not run: {e['reason']} | {paper_s} |")
        else:
            b, a = e["before"], e["after"]
            lines.append(f"| erase {e['relation']} ({e['n_erased']} neurons): relation perplexity | "
                         f"{_num(b['relation_ppl'])} -> {_num(a['relation_ppl'])}{_spread(b, a, 'relation')} | "
                         f"{paper_s} |")
            lines.append(f"| erase {e['relation']}: other relations' perplexity | "
                         f"{_num(b['other_ppl'])} -> {_num(a['other_ppl'])}{_spread(b, a, 'other')} | small change |")
    lines += ["", "## What this run shows", ""]
    lines += _findings(summary)
    lines += [
        "", "## Per relation", "",
        "| relation | sampled | counted | mean P | neurons/fact | suppress | amplify | random supp. | "
        "random ampl. | unrelated supp. |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rel, v in summary["per_relation"].items():
        npf = "n/a" if v["neurons_per_fact"] is None else f"{v['neurons_per_fact']:.1f}"
        lines.append(f"| {rel} | {v['sampled']} | {v['counted']} | {v['mean_prob']:.3f} | {npf} | "
                     f"{_pct(v['suppress'])} | {_pct(v['amplify'])} | {_pct(v['random_suppress'])} | "
                     f"{_pct(v['random_amplify'])} | {_pct(v['unrelated_suppress'])} |")
    lines += [
        "", "## Plots", "",
        "![knowledge neurons per layer](layer_distribution.png)", "",
        "![per-relation suppression and amplification](relations.png)", "",
        "![neurons per fact](neurons_per_fact.png)", "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _spread(before: dict, after: dict, what: str) -> str:
    """'' or the per-fact median and geometric mean, next to the pooled number."""
    b, a = before.get(f"{what}_spread"), after.get(f"{what}_spread")
    if not b or not a or not b["n"]:
        return ""
    return (f" (per fact: median {_num(b['median'])} -> {_num(a['median'])}, geometric mean "
            f"{_num(b['geometric'])} -> {_num(a['geometric'])})")


def _findings(summary: dict) -> list[str]:
    """Plain statements derived from the numbers, including where the model departs from BERT."""
    o, u = summary["overall"], summary["update"]
    found = []
    if o["suppress"] is not None:
        found.append(f"- Suppressing the knowledge neurons changed P(correct) by {_pct(o['suppress'])} "
                     f"(paper: {_pct(PAPER['suppress'])}); random neurons of the same layers: "
                     f"{_pct(o['random_suppress'])}.")
        found.append(f"- Amplifying them changed it by {_pct(o['amplify'])} (paper: "
                     f"{_pct(PAPER['amplify'])}); random neurons: {_pct(o['random_amplify'])}.")
        us = o["unrelated_suppress"]
        if us is not None and o["suppress"] < 0 and abs(us) > 0.5 * abs(o["suppress"]):
            found.append(f"- The same neurons also moved an unrelated fact of another relation by "
                         f"{_pct(us)} when suppressed: here they are **not specific** to their fact, "
                         "which supports the critique of Niu et al. (2024) more than the paper's claim.")
        elif us is not None:
            found.append(f"- On an unrelated fact the same neurons moved P by {_pct(us)} (suppress): "
                         "much less than on their own facts.")
    counts = summary["layer_counts"]
    if sum(counts):
        n = len(counts)
        top = sum(counts[int(0.75 * n):]) / sum(counts)
        found.append(f"- {top:.0%} of the knowledge neurons lie in the top quarter of the layers "
                     "(the paper finds them mostly in the topmost layers of BERT).")
    if u["facts"]:
        found.append(f"- Updating facts: change rate {_rate(u['change_rate'])}, success rate "
                     f"{_rate(u['success_rate'])} (paper: 48.5% / 34.4%); mean P(new target) "
                     f"{_num(u['p_new_before'])} -> {_num(u['p_new_after'])}.")
        if u["intra_ppl_after"] and u["intra_ppl_before"] and u["intra_ppl_after"] > 2 * u["intra_ppl_before"]:
            found.append(f"- But the update with the paper's lambda2 = 8 is far from surgical here: the "
                         f"perplexity of other facts of the same relation went {_num(u['intra_ppl_before'])} "
                         f"-> {_num(u['intra_ppl_after'])}, and of other relations "
                         f"{_num(u['inter_ppl_before'])} -> {_num(u['inter_ppl_after'])}.")
    return found
