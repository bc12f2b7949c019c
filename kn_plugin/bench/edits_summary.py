"""Summary and report of ``kn bench edits``, recomputed from its records alone.

Per method, over the edits (cases), CounterFact's means (:func:`kn_plugin.edit_metrics.summarize`):
efficacy ES, paraphrase PS, neighbourhood NS success and the harmonic-mean score S, fluency GE
after the edit, and the paper's perplexity measures as the mean rise of the mean-token NLL of
the neighbours' own answers (same relation) and of other relations' facts. Every headline
number carries a 95% bootstrap interval clustered by relation (:func:`kn_plugin.stats.cluster_interval`);
an order between two methods is stated only when a paired test over the same edits supports it
(:func:`kn_plugin.stats.paired_test` on each edit's success, the mean of its ES, PS and NS).
"""

from __future__ import annotations

import json
import statistics
from itertools import combinations
from pathlib import Path

from kn_plugin.bench.common import num, rate, report_header
from kn_plugin.bench.pararel_summary import test_cell, with_ci
from kn_plugin.edit_metrics import case_metrics, summarize
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.files import write_text_atomic
from kn_plugin.runs import read_json, read_stages
from kn_plugin.stats import cluster_interval, order_verdict, paired_test

#: per-case metrics averaged into the headline means
METRICS = ("ES", "PS", "NS", "EM", "PM", "NM")
BEFORE = "no edit"


def load_edits(folder: str | Path) -> dict:
    """The run in ``folder``: its manifest with every record it names, checked by content hash."""
    folder = Path(folder)
    data = read_json(folder / "results.json") if (folder / "results.json").is_file() else None
    if not isinstance(data, dict) or data.get("protocol") != "edits":
        raise KnowledgeNeuronError(f"{folder} holds no results of `kn bench edits` (no results.json of that run)")
    data["stages"] = read_stages(folder, data["records"], "`kn bench edits`")
    return data


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _rise(after: list[float], before: list[float]) -> float | None:
    """Mean over a case's prompts of NLL after - NLL before (nats)."""
    return _mean([a - b for a, b in zip(after, before)])


def case_rows(data: dict) -> dict[str, list[dict]]:
    """Per method (and ``no edit``), one row per case in the case order: its metrics, fluency,
    the NLL rises of its neighbours and other-relation facts, the editor's seconds."""
    cases = data["stages"]["cases"]
    rows: dict[str, list[dict]] = {BEFORE: []}
    for key, c in cases.items():
        b = c["before"]
        rows[BEFORE].append({"key": key, "relation": c["relation"], **case_metrics(b["scores"]),
                             "fluency": b["fluency"], "intra": 0.0 if c["neighbours"] else None,
                             "inter": 0.0 if c["others"] else None, "seconds": None})
    for method in data["config"]["methods"]:
        recs = data["stages"].get(method, {})
        out = []
        for key, c in cases.items():
            r, b = recs[key], c["before"]
            intra = _rise([x["true"] for x in r["scores"]["neighbourhood"]],
                          [x["true"] for x in b["scores"]["neighbourhood"]])
            out.append({"key": key, "relation": c["relation"], **r["metrics"], "fluency": r["fluency"],
                        "intra": intra, "inter": _rise(r["others"], b["others"]), "seconds": r["edit_seconds"],
                        "slots": r["slots"], "weight_change": r["weight_change"], "skipped": r.get("skipped")})
        rows[method] = out
    return rows


def case_success(row: dict) -> float | None:
    """One edit's success: the mean of its ES, PS and NS (those it has)."""
    return _mean([row.get(k) for k in ("ES", "PS", "NS")])


def _interval(rows: list[dict], stat, seed: int) -> dict:
    return cluster_interval(rows, [r["relation"] for r in rows], stat, seed=seed)


def summarize_method(rows: list[dict], seed: int = 0) -> dict:
    """Headline numbers of one method with their intervals."""
    out: dict = {"n": len(rows)}
    for name in METRICS + ("S",):
        out[name] = _interval(rows, lambda us, n=name: summarize(us)[n], seed)
    for name in ("fluency", "intra", "inter"):
        out[name] = _interval(rows, lambda us, n=name: _mean([u[n] for u in us]), seed)
    out["no_edit"] = sum(1 for r in rows if r.get("skipped"))
    secs = [r["seconds"] for r in rows if r["seconds"] is not None]
    out["seconds_mean"] = _mean(secs)
    out["seconds_median"] = statistics.median(secs) if secs else None
    return out


def summarize_edits(data: dict, seed: int = 0) -> dict:
    rows = case_rows(data)
    methods = list(data["config"]["methods"])
    s = {"model": data["model"], "edits": len(rows[BEFORE]),
         "relations": len({r["relation"] for r in rows[BEFORE]}),
         "methods": {m: summarize_method(rows[m], seed) for m in [BEFORE, *methods]}, "pairs": []}
    for a, b in combinations(methods, 2):
        test = paired_test([case_success(r) for r in rows[a]], [case_success(r) for r in rows[b]])
        fl = paired_test([r["fluency"] for r in rows[a]], [r["fluency"] for r in rows[b]])
        s["pairs"].append({"a": a, "b": b, "success": test, "a_better": order_verdict(test, "greater"),
                           "b_better": order_verdict(test, "less"), "fluency": fl})
    return s


def _verdict(p: dict) -> str:
    if p["a_better"] == "holds":
        return f"{p['a']} higher"
    if p["b_better"] == "holds":
        return f"{p['b']} higher"
    return "cannot tell"


def write_edits_report(folder: str | Path, data: dict, s: dict) -> Path:
    folder = Path(folder)
    c = data["config"]
    lines = report_header(
        f"Edits scored as the editing field scores them: {s['model']}",
        f"{s['edits']} counterfactual edits built from PARAREL facts the model knows ({s['relations']} relations), "
        f"made by each method on the same facts, with the knowledge neurons of `{data['source']}`.",
        data.get("command", ""))
    lines += ["Tables recomputed from the records in this folder (no model needed):", "", "```bash",
              f"kn bench edits-report {folder.as_posix()}", "```", "",
              "## Methods x CounterFact metrics", "",
              "Means over edits with 95% bootstrap intervals clustered by relation. ES / PS / NS: share of "
              "rewrite prompts / held-out paraphrases / same-relation neighbours where the edit's new object "
              "beats the true one (neighbours: their own answer beats it); S: their harmonic mean; GE: weighted "
              f"bi- and trigram entropy of {c['generation_tokens']} sampled tokens after the rewrite prompt; "
              "intra / inter: mean rise of the mean-token NLL (nats) of the neighbours' answers / of other "
              "relations' facts; s/edit: seconds to make one edit (mean; median in brackets).", "",
              "| method | ES | PS | NS | S | GE | intra NLL rise | inter NLL rise | s/edit |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, v in s["methods"].items():
        secs = "n/a" if v["seconds_mean"] is None else f"{v['seconds_mean']:.2f} ({v['seconds_median']:.2f})"
        name = f"{m} (no edit made on {v['no_edit']})" if m != BEFORE and v["no_edit"] else m
        lines.append(f"| {name} | " + " | ".join(with_ci(v[k], rate) for k in ("ES", "PS", "NS", "S")) + " | "
                     + " | ".join(with_ci(v[k], num) for k in ("fluency", "intra", "inter")) + f" | {secs} |")
    lines += ["", "Magnitudes (mean P(new) - P(true) on rewrite / paraphrase prompts; neighbours: P(own answer) "
              "- P(new)):", "", "| method | EM | PM | NM |", "| --- | --- | --- | --- |"]
    for m, v in s["methods"].items():
        lines.append(f"| {m} | " + " | ".join(with_ci(v[k], num) for k in ("EM", "PM", "NM")) + " |")
    lines += ["", "## Which method edits better (paired over the same edits)", "",
              "Each edit's success is the mean of its ES, PS and NS; an order is stated only where the Wilcoxon "
              "signed-rank and sign tests both reject equality at 5%.", "",
              "| pair | edit success | verdict | fluency (GE) |", "| --- | --- | --- | --- |"]
    for p in s["pairs"]:
        lines.append(f"| {p['a']} vs {p['b']} | {test_cell(p['success'])} | {_verdict(p)} | "
                     f"{test_cell(p['fluency'])} |")
    r = data.get("rome")
    lines += ["", "## Setup", "",
              f"- Knowledge-neuron updates: the refined neurons of `{data['source']}` (located on k prompts of each "
              f"fact, held-out prompts untouched); paper: lambda1 = {c['lambda1']}, lambda2 = {c['lambda2']}; "
              "authors: the released code's 10% rule and norm-scaled embeddings, signed by activation; calibrated: "
              "kn's default (smallest lambda2 of the ladder that puts the new object on top of the locate prompts); "
              f"constrained: ROME's constrained least squares on the knowledge neurons' slots alone (key statistics "
              f"over the first {c.get('constrained_texts', 'n/a')} corpus texts), as little as puts the new object on "
              "top of the locate prompts.",
              f"- Neighbourhood: {c['neighbours']} other known facts of the relation whose object is not the new "
              f"one; other relations: {c['neighbours']} known facts of other relations."]
    if r is not None:
        how = (f"the peak of the causal trace, mean indirect effect over {len(r['trace']['cases'])} edits, "
               f"{r['trace']['seconds']:.0f} s" if r.get("trace") else "given")
        lines.append(f"- Rank-one editor: layer {r['layer']} ({how}); key statistics over {r['corpus_texts']} texts "
                     f"of {r['corpus_tokens']} tokens the model wrote (top-k 5, seed 0; written in "
                     f"{r['corpus_seconds']:.0f} s, not counted in s/edit); v* by Adam, at most {c['rome_steps']} "
                     "steps, ROME's GPT-2 XL hyper-parameters.")
    lines += ["", "## Where this departs from ROME's CounterFact evaluation", "",
              "- Edits come from PARAREL facts the model knows, not CounterFact's records; the new object is "
              "another object of the relation (CounterFact draws it the same way).",
              "- Neighbourhood prompts are about other subjects of the same relation and are scored against "
              "their own answer; CounterFact's neighbours share the true object, so there the two coincide.",
              "- Fluency: one generation prompt (the rewrite prompt) per edit; words split by a regular "
              "expression instead of NLTK's tokenizer. Multi-token objects are scored by mean token NLL.", ""]
    path = folder / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path


def write_edits_summary(folder: str | Path) -> dict:
    """``folder/summary.json`` and ``report.md`` from the records; returns the summary."""
    folder = Path(folder)
    data = load_edits(folder)
    s = summarize_edits(data)
    write_text_atomic(folder / "summary.json", json.dumps(s, indent=1))
    write_edits_report(folder, data, s)
    return s
