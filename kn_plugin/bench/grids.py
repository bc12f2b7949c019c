"""``kn bench grids``: what the integration rule and the number of steps change.

On the same counted PARAREL facts, for each rule of :data:`kn_plugin.attribution.GRIDS` and
each m: seconds per prompt, the completeness error (sum of a layer's scores minus that layer's
P(full) - P(zeroed), in probability units and relative to the layer's effect), and the Jaccard
overlap of the coarse and refined neuron sets with those of a converged reference
(Gauss-Legendre with many steps). Resumable: one JSON record per fact, written atomically.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from kn_plugin.attribution import (
    CONVERGED,
    GRIDS,
    STEP_RULES,
    KnowledgeAttribution,
    KnowledgeNeuronWarning,
    check_grid,
    worst_relative_gap,
)
from kn_plugin.bench.common import assess_fact, neuron_jaccard
from kn_plugin.bench.speed import layer_steps
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.locating import DEFAULT_THRESHOLD, coarse_neurons, refine_adaptive
from kn_plugin.models import LoadedModel
from kn_plugin.plotting import _pyplot
from kn_plugin.runs import check_run, clear_stale, resumable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridsConfig:
    """Checked settings of ``kn bench grids``."""

    grids: tuple[str, ...] = GRIDS
    steps: tuple[int, ...] = (5, 10, 20, 50)
    reference_grid: str = "gausslegendre"
    reference_steps: int = 100
    prompts_per_fact: int = 3
    max_rank: int = 10
    min_known: float = 0.5
    threshold: float = DEFAULT_THRESHOLD
    batch_size: int = 10
    #: also the converged preset (:data:`~kn_plugin.attribution.CONVERGED`: Gauss-Legendre, each
    #: layer refined where its path needs it, per-neuron error estimates), row "adaptive"
    converged: bool = False

    def identity(self) -> dict:
        """The run's settings as its folder records them (``converged`` only when set, so that a
        folder written before the option existed resumes unchanged)."""
        out = asdict(self)
        if not self.converged:
            del out["converged"]
        else:  # the preset it ran: a folder of an earlier preset ("converged": true) is not resumed with this one
            out["converged"] = dict(CONVERGED)
        return out

    def __post_init__(self):
        for g in (*self.grids, self.reference_grid):
            check_grid(g)
        if not self.grids or not self.steps or min(self.steps) < 2 or self.reference_steps < 2:
            raise KnowledgeNeuronError("give at least one grid and steps >= 2 (the trapezoid rule needs 2)")
        if self.prompts_per_fact < 2:
            raise KnowledgeNeuronError("refinement needs at least 2 prompts per fact")
        if not 0 < self.min_known <= 1 or self.max_rank < 1 or self.batch_size < 1:
            raise KnowledgeNeuronError("max rank and batch size must be >= 1 and min known in (0, 1]")


def _fact_record(model: LoadedModel, fact, config: GridsConfig) -> dict:
    record = assess_fact(model, fact, config.max_rank, config.min_known)
    known = [p for p, r in zip(record["prompts"], record["rank"]) if r < config.max_rank]
    record["counted"] = record["counted"] and len(known) >= 2  # refinement needs two known prompts
    if not record["counted"]:
        return record
    prompts = known[: config.prompts_per_fact]
    record["used_prompts"] = prompts
    ka = KnowledgeAttribution(model)

    def run(grid, steps):
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # a capped ladder is reported by its completeness gap in the row
            warnings.simplefilter("ignore", KnowledgeNeuronWarning)
            results = [ka.attribute(p, fact.target, steps=steps, grid=grid, batch_size=config.batch_size,
                                    progress=False) for p in prompts]
        seconds = (time.perf_counter() - t0) / len(prompts)
        coarse = [coarse_neurons(r, config.threshold) for r in results]
        return results, coarse, refine_adaptive(coarse)[0], seconds

    _, ref_coarse, ref_refined, ref_s = run(config.reference_grid, config.reference_steps)
    record["reference"] = {"seconds_per_prompt": ref_s, "refined": [list(n.key) for n in ref_refined]}
    rows = []
    for grid, steps in _settings(config):
        results, coarse, refined, seconds = run(grid, steps)
        row = {
            "grid": grid, "steps": steps, "seconds_per_prompt": seconds,
            "abs_gap": [r.completeness_gap[list(r.layers)].abs().max().item() for r in results],
            "rel_gap": [worst_relative_gap(r) for r in results],
            "coarse_jaccard": [neuron_jaccard(c, rc) for c, rc in zip(coarse, ref_coarse)],
            "refined_jaccard": neuron_jaccard(refined, ref_refined), "engine": results[0].engine,
        }
        if steps in STEP_RULES:  # the alpha points each prompt paid for, over its layers
            row["layer_steps"] = [layer_steps(r) for r in results]
        rows.append(row)
    record["rows"] = rows
    return record


def run_grids(model: LoadedModel, data: dict, out: str | os.PathLike, config: GridsConfig,
              progress: bool = True) -> list[dict]:
    """Run (or resume) the benchmark; one record per fact under ``out/facts``."""
    out = Path(out)
    check_run(out, {**model.identity(), **config.identity()})
    clear_stale(out)
    facts = [f for rel in sorted(data) for f in data[rel]]
    return resumable(out, "facts", [(f.key, lambda f=f: _fact_record(model, f, config)) for f in facts], "facts",
                     progress)


def _settings(config: GridsConfig) -> list[tuple[str, int | str]]:
    """Every (rule, m) the run measures, the converged preset last (m "adaptive")."""
    fixed = [(grid, steps) for grid in config.grids for steps in config.steps]
    return fixed + ([(CONVERGED["grid"], CONVERGED["steps"])] if config.converged else [])


def summarize_grids(records: list[dict], config: GridsConfig) -> list[dict]:
    """One row per (grid, steps): medians and worst cases over the counted facts' prompts."""
    counted = [r for r in records if r.get("rows")]
    table = []
    for grid, steps in _settings(config):
        rows = [row for r in counted for row in r["rows"] if row["grid"] == grid and row["steps"] == steps]
        if not rows:
            continue
        abs_gap = [g for row in rows for g in row["abs_gap"]]
        rel_gap = [g for row in rows for g in row["rel_gap"]]
        coarse = [j for row in rows for j in row["coarse_jaccard"]]
        entry = {
            "grid": grid, "steps": steps, "facts": len(rows),
            "seconds_per_prompt": statistics.median(row["seconds_per_prompt"] for row in rows),
            "median_abs_gap": statistics.median(abs_gap), "worst_abs_gap": max(abs_gap),
            "median_rel_gap": statistics.median(rel_gap), "worst_rel_gap": max(rel_gap),
            "coarse_jaccard": statistics.mean(coarse),
            "refined_jaccard": statistics.mean(row["refined_jaccard"] for row in rows),
        }
        if steps in STEP_RULES:
            entry["median_layer_steps"] = statistics.median(n for row in rows for n in row["layer_steps"])
        table.append(entry)
    return table


def plot_grids(table: list[dict], path: Path) -> Path:
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for grid in dict.fromkeys(r["grid"] for r in table):
        rows = [r for r in table if r["grid"] == grid and r["steps"] not in STEP_RULES]
        secs = [r["seconds_per_prompt"] for r in rows]
        ax1.plot(secs, [max(r["median_abs_gap"], 1e-12) for r in rows], marker="o", label=grid)
        ax2.plot(secs, [r["refined_jaccard"] for r in rows], marker="o", label=grid)
        for r in rows:
            ax1.annotate(str(r["steps"]), (r["seconds_per_prompt"], max(r["median_abs_gap"], 1e-12)), fontsize=7)
    for r in (r for r in table if r["steps"] in STEP_RULES):
        ax1.plot([r["seconds_per_prompt"]], [max(r["median_abs_gap"], 1e-12)], "k*", markersize=12, label="converged")
        ax2.plot([r["seconds_per_prompt"]], [r["refined_jaccard"]], "k*", markersize=12, label="converged")
    ax1.set_yscale("log")
    ax1.set_xlabel("seconds per prompt")
    ax1.set_ylabel("median completeness error (probability)")
    ax2.set_xlabel("seconds per prompt")
    ax2.set_ylabel("refined-set Jaccard with the converged reference")
    ax2.set_ylim(-0.05, 1.05)
    ax1.legend(fontsize=8)
    fig.suptitle("Integration rule and steps: error and agreement vs cost (labels: m)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_grids_report(records: list[dict], table: list[dict], out: str | os.PathLike, model_name: str,
                       command: str, config: GridsConfig) -> Path:
    out = Path(out)
    plot = plot_grids(table, out / "grids.png") if table else None
    counted = [r for r in records if r.get("rows")]
    lines = [
        f"# Integration rules and steps: {model_name}", "",
        f"Command: `{command}`", "",
        f"{len(counted)} counted facts of {len(records)} sampled (a prompt knows the fact when the object's first "
        f"token ranks below {config.max_rank}; a fact counts when at least {config.min_known:.0%} of its prompts "
        f"know it), up to {config.prompts_per_fact} known prompts each. Reference: {config.reference_grid} with "
        f"m = {config.reference_steps}. Completeness error: per prompt, the largest |sum of a layer's scores - "
        "(P(full) - P(layer zeroed))| over the layers, in probability units; relative: the same divided by the "
        "layer's effect (floored at 1e-3 of the largest effect). Jaccard: coarse sets per prompt, refined sets "
        "(adaptive, as `locate`) per fact, against the reference's."
        + (" Row m = adaptive: the converged preset (`--converged`: Gauss-Legendre, 5 points per layer; a layer "
           "whose completeness gap misses 1% of its effect is integrated by a composite rule, bisected until each "
           "interval's per-neuron error estimate is within 1% of the largest score)." if config.converged else ""),
        "",
        "| rule | m | s / prompt | median error | worst error | median rel. | worst rel. | coarse Jaccard | "
        "refined Jaccard |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in table:
        lines.append(f"| {r['grid']} | {r['steps']} | {r['seconds_per_prompt']:.2f} | {r['median_abs_gap']:.1e} | "
                     f"{r['worst_abs_gap']:.1e} | {r['median_rel_gap']:.1e} | {r['worst_rel_gap']:.1e} | "
                     f"{r['coarse_jaccard']:.3f} | {r['refined_jaccard']:.3f} |")
    if plot:
        lines += ["", f"![error and agreement vs cost]({plot.name})"]
    lines += ["", "## Recommendation (computed from the table)", "", recommendation(table)]
    auto = next((r for r in table if r["steps"] in STEP_RULES), None)
    if auto:
        paper = next((r for r in table if r["grid"] == "riemann_right" and r["steps"] == 20), None)
        lines += ["", f"Converged preset: {recommendation_line(auto, paper)}"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def recommendation(table: list[dict], min_jaccard: float = 0.9) -> str:
    """The cheapest (rule, m) whose refined sets agree with the reference, next to the paper's
    rule at m = 20 and to Gauss-Legendre at m = 5 (a quarter of the paper's cost)."""
    if not table:
        return "No fact counted: nothing to recommend."

    def find(grid, steps):
        return next((r for r in table if r["grid"] == grid and r["steps"] == steps), None)

    def describe(r):
        how = (f"the converged preset ({r['grid']}, each layer its own points, median {r['median_layer_steps']:g} "
               "layer-points evaluated per prompt)" if r["steps"] in STEP_RULES else f"{r['grid']} with m = {r['steps']}")
        return (f"{how} ({r['seconds_per_prompt']:.2f} s per prompt, median completeness "
                f"error {r['median_abs_gap']:.1e}, refined Jaccard {r['refined_jaccard']:.2f})")

    lines = []
    paper, gl5 = find("riemann_right", 20), find("gausslegendre", 5)
    if paper:
        lines.append(f"The paper's setting is {describe(paper)}.")
    if gl5 and paper:
        verdict = "matches" if gl5["refined_jaccard"] >= paper["refined_jaccard"] - 0.05 else "does not match"
        lines.append(f"Gauss-Legendre at m = 5 {verdict} it: {describe(gl5)}.")
    good = [r for r in table if r["refined_jaccard"] >= min_jaccard]
    if good:
        best = min(good, key=lambda r: r["seconds_per_prompt"])
        lines.append(f"The cheapest setting whose refined sets share at least {min_jaccard:.0%} with the converged "
                     f"reference is {describe(best)}.")
    else:
        lines.append(f"No setting reached a refined-set Jaccard of {min_jaccard:.0%} with the reference.")
    return " ".join(lines)


def recommendation_line(auto: dict, paper: dict | None) -> str:
    """The converged preset against the reference, and against the paper's m = 20 when measured."""
    text = (f"refined-set Jaccard {auto['refined_jaccard']:.2f} with the reference (coarse {auto['coarse_jaccard']:.2f}), "
            f"worst relative completeness gap {auto['worst_rel_gap']:.1e}, {auto['seconds_per_prompt']:.2f} s per prompt")
    if paper:
        text += (f"; the paper's riemann_right m = 20: Jaccard {paper['refined_jaccard']:.2f}, "
                 f"{paper['seconds_per_prompt']:.2f} s per prompt")
    return text + "."
