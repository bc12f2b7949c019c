"""``kn bench methods``: which attribution method finds the neurons that matter, at what cost.

On the same counted PARAREL facts and prompts, every method locates knowledge neurons
through the same adaptive refinement; then its neurons are suppressed and amplified on the
fact, on an unrelated fact and against random neurons of the same layers, and its refined
set is compared with IG's. Resumable: one file per fact and per (method, fact).
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

from tqdm.auto import tqdm

from kn_plugin.bench.common import assess_fact, intervention_record, report_header
from kn_plugin.defaults import PAPER_STEPS
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.locating import LocateConfig, LowProbabilityWarning, locate_quietly
from kn_plugin.models import LoadedModel
from kn_plugin.paper import ratio_of_means
from kn_plugin.plotting import plot_effect_vs_cost
from kn_plugin.runs import check_run, clear_stale, read_json, resumable, write_atomic
from kn_plugin.stats import jaccard

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("ig", "grad_x_act", "atp", "activation", "conductance")


@dataclass(frozen=True)
class MethodsConfig:
    """Checked settings of ``kn bench methods``."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    steps: int = PAPER_STEPS
    batch_size: int = 10
    prompts_per_fact: int = 3  # known prompts (rank < max_rank) first
    max_rank: int = 10
    min_known: float = 0.5
    random_draws: int = 5
    seed: int = 0
    engine: str = "fast"

    def __post_init__(self):
        if not self.methods:
            raise KnowledgeNeuronError("--methods is empty")
        if len(set(self.methods)) != len(self.methods):
            raise KnowledgeNeuronError(f"a method is listed twice: {', '.join(self.methods)}")
        for name in ("steps", "batch_size", "prompts_per_fact", "max_rank", "random_draws"):
            if getattr(self, name) < 1:
                raise KnowledgeNeuronError(f"{name.replace('_', ' ')} must be >= 1")
        if self.prompts_per_fact < 2:
            raise KnowledgeNeuronError("refinement needs at least 2 prompts per fact")
        if not 0 < self.min_known <= 1:
            raise KnowledgeNeuronError(f"min_known must be in (0, 1], got {self.min_known}")
        self.locate  # noqa: B018 - the locate settings of every method, checked once here

    @cached_property
    def locate(self) -> dict[str, LocateConfig]:
        """How each method locates a fact's neurons (the paper's adaptive p), by method name."""
        return {m: LocateConfig(method=m, steps=self.steps, batch_size=self.batch_size, engine=self.engine,
                                progress=False) for m in self.methods}


def method_slug(method: str) -> str:
    """A file-name-safe form of a method name (``captum:LayerConductance`` -> ``captum-LayerConductance``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", method)


def _chosen_prompts(record: dict, config: MethodsConfig) -> tuple[list[str], list[float]]:
    order = sorted(range(len(record["prompts"])), key=lambda i: (record["rank"][i] >= config.max_rank, i))
    keep = sorted(order[:config.prompts_per_fact])
    return [record["prompts"][i] for i in keep], [record["prob"][i] for i in keep]


def method_task(model: LoadedModel, record: dict, unrelated, method: str, config: MethodsConfig) -> dict:
    """Locate one fact's neurons with ``method``, then suppress/amplify them with controls."""
    prompts, probs = _chosen_prompts(record, config)
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # the record keeps the probabilities; no warning per method
        warnings.simplefilter("ignore", LowProbabilityWarning)
        res = locate_quietly(model, prompts, record["target"], config=config.locate[method])
    seconds = time.perf_counter() - t0
    out = {"key": record["key"], "relation": record["relation"], "method": method, "n_prompts": len(prompts),
           "seconds": seconds, "neurons": [[n.layer, n.index, n.score] for n in res.neurons], "share": res.share,
           "engines": sorted({a.engine for a in res.attributions})}
    neurons = [(n.layer, n.index) for n in res.neurons]
    if neurons:
        out.update(intervention_record(model, prompts, record["target"], probs, neurons, unrelated, config.seed,
                                       config.random_draws))
    return out


class _Unrelated:
    """The first prompt of a fact of another relation (what the unrelated control needs)."""

    def __init__(self, record: dict):
        self.key, self.prompts, self.target = record["key"], record["prompts"][:1], record["target"]


def run_methods(model: LoadedModel, data: dict, out: str | os.PathLike, config: MethodsConfig,
                progress: bool = True) -> dict:
    """Assess every sampled fact, then run every method on the counted ones (resumable)."""
    out = Path(out)
    # methods have their own folders: adding one to a finished run is a resume, not a change
    check_run(out, {**model.identity(), **{k: v for k, v in asdict(config).items() if k != "methods"}})
    clear_stale(out)
    facts = [f for rel in sorted(data) for f in data[rel]]
    records = resumable(out, "facts", [(f.key, lambda f=f: assess_fact(model, f, config.max_rank, config.min_known))
                                       for f in facts], "assess", progress)
    counted = [r for r in records if r["counted"]]
    runs: dict[str, list[dict]] = {m: [] for m in config.methods}
    with tqdm(total=len(counted) * len(config.methods), desc="methods", unit="run", disable=not progress) as bar:
        for i, rec in enumerate(counted):
            others = [r for r in counted[i + 1:] + counted[:i] if r["relation"] != rec["relation"]]
            if not others:
                raise KnowledgeNeuronError("the unrelated-fact control needs counted facts of at least two relations")
            unrelated = _Unrelated(others[0])
            for method in config.methods:
                path = out / "methods" / method_slug(method) / f"{rec['key']}.json"
                run = read_json(path)
                if run is None:
                    run = method_task(model, rec, unrelated, method, config)
                    write_atomic(path, run)
                runs[method].append(run)
                bar.update(1)
    return {"records": records, "runs": runs}


def _ratio(pairs: list[tuple[list[float], list[float]]]) -> float | None:
    """Ratio of means pooled over every prompt of the pairs (before, after)."""
    return ratio_of_means([x for b, _ in pairs for x in b], [x for _, a in pairs for x in a])


def summarize_methods(run: dict) -> dict:
    ig = {r["key"]: r for r in run["runs"].get("ig", [])}
    out = {}
    for method, recs in run["runs"].items():
        acted = [r for r in recs if "suppress" in r]
        row = {
            "facts": len(recs),
            "prompts": sum(r["n_prompts"] for r in recs),
            "seconds_per_prompt": sum(r["seconds"] for r in recs) / max(1, sum(r["n_prompts"] for r in recs)),
            "neurons_per_fact": sum(len(r["neurons"]) for r in recs) / max(1, len(recs)),
            "empty": sum(not r["neurons"] for r in recs),
        }
        for name in ("suppress", "amplify"):
            row[name] = _ratio([(r[name]["before"], r[name]["after"]) for r in acted])
            row[f"random_{name}"] = _ratio([(r[name]["before"], r[name]["random_after"]) for r in acted])
            row[f"unrelated_{name}"] = _ratio([(r[name]["unrelated_before"], r[name]["unrelated_after"])
                                               for r in acted])
        jac = [j for r in recs if r["key"] in ig
               for j in [jaccard(r["neurons"], ig[r["key"]]["neurons"], both_empty=None)] if j is not None]
        row["jaccard_with_ig"] = sum(jac) / len(jac) if jac else None
        out[method] = row
    counted = [r for r in run["records"] if r["counted"]]
    return {"sampled": len(run["records"]), "counted": len(counted),
            "relations": sorted({r["relation"] for r in run["records"]}),
            "counted_relations": sorted({r["relation"] for r in counted}), "methods": out}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def _findings(summary: dict) -> list[str]:
    """Plain statements derived from the numbers."""
    rows = summary["methods"]
    lines = []
    ig = rows.get("ig")
    if ig is None or ig["suppress"] is None:
        return ["- IG was not run (or located no neurons), so there is no reference to compare with."]
    for name, r in rows.items():
        if name == "ig" or r["suppress"] is None:
            continue
        speed = ig["seconds_per_prompt"] / r["seconds_per_prompt"] if r["seconds_per_prompt"] else float("inf")
        strength = r["suppress"] / ig["suppress"] if ig["suppress"] else float("nan")
        jac = "n/a" if r["jaccard_with_ig"] is None else f"{r['jaccard_with_ig']:.2f}"
        pace = f"{speed:.1f}x faster" if speed >= 1 else f"{1 / speed:.1f}x slower"
        lines.append(f"- **{name}**: {pace} than IG per prompt; "
                     f"suppressing its neurons moves P(correct) by {_pct(r['suppress'])} (IG: {_pct(ig['suppress'])}, "
                     f"{strength:.0%} of IG's effect), an unrelated fact by {_pct(r['unrelated_suppress'])} (IG: "
                     f"{_pct(ig['unrelated_suppress'])}); {r['neurons_per_fact']:.1f} neurons per fact, refined-set "
                     f"Jaccard with IG {jac}.")
    cheap = [(n, r) for n, r in rows.items() if n != "ig" and r["suppress"] is not None
             and r["seconds_per_prompt"] < ig["seconds_per_prompt"] / 5]
    worthy = [(n, r) for n, r in cheap if r["suppress"] <= 0.9 * ig["suppress"]
              and abs(r["unrelated_suppress"] or 0) <= abs(ig["unrelated_suppress"] or 0) + 0.05]
    if worthy:
        names = ", ".join(n for n, _ in worthy)
        lines.append(f"- On these facts IG is **not worth its cost** for finding neurons whose suppression removes "
                     f"the fact: {names} reach at least 90% of IG's suppression at under a fifth of its cost, with "
                     "no worse an effect on the unrelated fact.")
    elif cheap:
        lines.append("- No method costing under a fifth of IG matched 90% of its suppression effect with an equally "
                     "small effect on the unrelated fact: on these facts IG's extra cost buys stronger or more "
                     "specific neurons.")
    spec = [n for n, r in rows.items() if r["suppress"] is not None and r["unrelated_suppress"] is not None
            and abs(r["unrelated_suppress"]) > 0.5 * abs(r["suppress"])]
    if spec:
        lines.append(f"- Not fact-specific (the unrelated fact moves by more than half as much as the fact itself): "
                     f"{', '.join(spec)} - the critique of Niu et al. (2024) applies to them.")
    return lines


def write_methods_report(summary: dict, out: str | os.PathLike, model_name: str, command: str,
                         config: MethodsConfig) -> Path:
    out = Path(out)
    rows = summary["methods"]
    plot_effect_vs_cost(rows, out / "effect_vs_cost.png", f"{model_name}: attribution methods, effect vs cost")
    lines = [
        *report_header(
            f"Attribution methods for knowledge neurons: {model_name}",
            "Every method locates knowledge neurons on the same counted PARAREL facts and prompts through the same "
            "pipeline (coarse t = 0.2 of the prompt's largest score, adaptive refinement from p = 0.7 towards 2-5 "
            "neurons). Its neurons are then suppressed (x0) and amplified (x2) at the prediction position.", command),
        "## Setup",
        "",
        f"- {summary['sampled']} facts sampled from {len(summary['relations'])} relations "
        f"({', '.join(summary['relations'])}); {summary['counted']} count (the first target token ranks in the "
        f"top {config.max_rank} for at least {config.min_known:.0%} of the prompts), from "
        f"{len(summary['counted_relations'])} relations ({', '.join(summary['counted_relations'])}). Each counted fact uses "
        f"{config.prompts_per_fact} prompts, the known ones first.",
        f"- Methods: IG (m = {config.steps}, the fast engine), activation (the paper's baseline), grad_x_act "
        "(activation x gradient of P, one pass), atp (attribution patching to zero at every position, first-order "
        "change of log P, one pass), conductance (Captum's LayerConductance per layer, m steps, Riemann right).",
        f"- Effects are ratios of means over all prompts; random control: the same number of neurons per layer, "
        f"{config.random_draws} draws; unrelated control: the same neurons on the first prompt of a counted fact "
        "of another relation. Jaccard: refined set vs IG's on the same fact.",
        "",
        "## Results",
        "",
        "| method | s/prompt | neurons/fact | empty sets | suppress | amplify | random supp. | random ampl. | "
        "unrelated supp. | unrelated ampl. | Jaccard with IG |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        jac = "n/a" if r["jaccard_with_ig"] is None else f"{r['jaccard_with_ig']:.2f}"
        lines.append(f"| {name} | {r['seconds_per_prompt']:.3f} | {r['neurons_per_fact']:.1f} | {r['empty']}/"
                     f"{r['facts']} | {_pct(r['suppress'])} | {_pct(r['amplify'])} | {_pct(r['random_suppress'])} | "
                     f"{_pct(r['random_amplify'])} | {_pct(r['unrelated_suppress'])} | {_pct(r['unrelated_amplify'])} "
                     f"| {jac} |")
    lines += ["", "## What this run shows", "", *_findings(summary), "",
              "![effect vs cost](effect_vs_cost.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
