"""``kn bench convergence``: two ``kn bench pararel`` runs on the same facts, one at the paper's
m = 20 and one with converged attributions, side by side, with paired tests fact by fact.

Both runs must hold the same model and the same drawn facts (refinement tunes p per relation
on the relation's facts, so the m = 20 run to set beside a converged one is the run of the
same draw, not a subset of a larger run). Reported: the paper's table of each run (held-out
prompts, :func:`kn_plugin.bench.pararel_summary.paper_rows`), and over the facts located in
both, the Jaccard index of their refined neuron sets (mean with a bootstrap interval
clustered by relation) and paired tests of each fact's held-out relative change under
suppression and amplification (Wilcoxon and sign tests).
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from kn_plugin import paper
from kn_plugin.bench.common import num, report_header
from kn_plugin.bench.pararel_summary import _split, load_run, paper_rows, summarize, test_cell, with_ci
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.files import write_text_atomic
from kn_plugin.stats import cluster_interval, jaccard, paired_test


def _label(run: dict) -> str:
    c = run["config"]
    return f"m = {c['steps']} ({c['grid']})" if isinstance(c["steps"], int) else f"converged (steps {c['steps']}, {c['grid']})"


def _changes(run: dict, op: str) -> dict[str, float]:
    out = {}
    for e in run["effects"]:
        h = _split(e, "held_out")
        v = paper.ratio_of_means(h["before"], h[f"kn_{op}"]) if h["before"] else None
        if v is not None:
            out[e["key"]] = v
    return out


def compare_runs(a: dict, b: dict, seed: int = 0) -> dict:
    """The side-by-side numbers of runs ``a`` and ``b`` (each :func:`load_run`)."""
    if a["fingerprint"] != b["fingerprint"] or a.get("weights") != b.get("weights"):
        raise KnowledgeNeuronError("the two runs are of different models (or weights): compare runs of one model")
    if a["relations"] != b["relations"]:
        raise KnowledgeNeuronError("the two runs hold different facts: run both with the same --relations, "
                                   "--facts-per-relation and --seed")
    sa, sb = summarize(a, seed), summarize(b, seed)
    sets_a, sets_b = a["refined"]["sets"], b["refined"]["sets"]
    both = [r for rel in sorted(a["facts"]) for r in a["facts"][rel]
            if sets_a.get(r["key"], {}).get("kn") and sets_b.get(r["key"], {}).get("kn")]
    units = [{"relation": r["relation"], "j": jaccard(sets_a[r["key"]]["kn"], sets_b[r["key"]]["kn"])} for r in both]
    out = {"labels": [_label(a), _label(b)], "summaries": [sa, sb], "located_both": len(both),
           "located": [sa["located"], sb["located"]],
           "jaccard": cluster_interval(units, [u["relation"] for u in units],
                                       lambda us: sum(u["j"] for u in us) / len(us) if us else None, seed=seed),
           "jaccard_median": statistics.median([u["j"] for u in units]) if units else None}
    for op in ("suppress", "amplify"):
        ca, cb = _changes(a, op), _changes(b, op)
        keys = [r["key"] for r in both if r["key"] in ca and r["key"] in cb]
        out[f"paired_{op}"] = paired_test([cb[k] for k in keys], [ca[k] for k in keys])
    return out


def _steps(s: dict) -> str:
    st = s.get("steps_used")
    return "n/a" if not st else f"mean {st['mean']:.1f} (min {st['min']}, max {st['max']})"


def _claim(claim: str) -> str:
    """A row's claim without the run-specific neuron count ("erase P19 (16 neurons): ...")."""
    return re.sub(r" \(\d+ neurons\)", "", claim)


def write_convergence(folders: list[str | Path], out: str | Path, command: str) -> Path:
    """The markdown comparison of two run folders (first: m = 20, second: converged)."""
    if len(folders) != 2:
        raise KnowledgeNeuronError("give two `kn bench pararel` folders: the m = 20 run and the converged one")
    a, b = (load_run(f) for f in folders)
    c = compare_runs(a, b)
    sa, sb = c["summaries"]
    la, lb = c["labels"]
    lines = report_header(f"m = 20 against converged attributions: {a['model']}",
                          f"The same {sa['sampled']} drawn facts, located and tested twice.", command)
    lines += [f"| claim (held-out prompts) | {la} | {lb} | paper |", "| --- | --- | --- | --- |",
              f"| facts counted / with knowledge neurons | {sa['counted']} / {sa['located']} | "
              f"{sb['counted']} / {sb['located']} | |"]
    rows_b = {_claim(claim): (ours, verdict) for claim, ours, _, verdict in paper_rows(sb)}
    for claim, ours, pap, verdict in paper_rows(sa):
        other, v2 = rows_b.get(_claim(claim), ("n/a", "n/a"))
        cell = lambda x, v: x if v == "n/a" else f"{x} ({v})"  # noqa: E731
        lines.append(f"| {claim} | {cell(ours, verdict)} | {cell(other, v2)} | {pap} |")
    lines += ["", "## Fact by fact", "",
              f"- Facts with knowledge neurons in both runs: {c['located_both']}.",
              f"- Jaccard index of their refined neuron sets: mean {with_ci(c['jaccard'], num)}, median "
              f"{num(c['jaccard_median'])}.",
              f"- Attribution steps (per prompt, the largest m of its layers): {la}: {_steps(sa)}; {lb}: "
              f"{_steps(sb)}; attribution and interventions took {sa['seconds']:.0f} s and {sb['seconds']:.0f} s "
              "(as the records hold them, each measured under its own machine load).",
              "- Held-out relative change per fact, converged against m = 20 (greater = the converged change "
              "is larger):",
              f"  - suppress: {test_cell(c['paired_suppress'])}",
              f"  - amplify: {test_cell(c['paired_amplify'])}", ""]
    links = [Path(f).as_posix() + "/report.md" for f in folders]
    lines += ["Runs: " + ", ".join(links), ""]
    out = Path(out)
    write_text_atomic(out, "\n".join(lines))
    write_text_atomic(out.with_suffix(".json"), json.dumps({k: v for k, v in c.items() if k != "summaries"},
                                                           indent=1))
    return out
