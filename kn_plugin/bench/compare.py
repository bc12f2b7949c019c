"""``kn bench compare``: the headline findings of two or more models side by side, each with
whether it holds on all of them (from the ``results.json`` of ``kn bench pararel`` and
``kn bench findings`` runs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from kn_plugin.bench.common import num, rate
from kn_plugin.bench.pararel_summary import load_run, paper_rows, summarize
from kn_plugin.errors import KnowledgeNeuronError


def _pararel_rows(s: dict) -> list[tuple[str, str, bool | None]]:
    """The paper's table (held-out prompts) of a ``kn bench pararel`` run, each cell with its
    verdict; "holds" per model (None where the verdict is n/a or cannot tell)."""
    rows = [("facts counted / with knowledge neurons", f"{s['counted']} / {s['located']}", None)]
    for claim, ours, paper, verdict in paper_rows(s):
        if claim.startswith("erase") and " (" in claim.split(":")[0]:  # "erase P19 (3 neurons): ..." -> no count
            claim = claim.split(" (")[0] + claim[claim.index(":"):]
        edits = re.search(r"\((\d+) edits, ", claim)  # "... (52 edits, prompts ...)": the count goes in the cell
        if edits:
            claim = claim.replace(edits.group(0), "(")
            ours = f"{ours}, {edits.group(1)} edits"
        cell = ours if verdict == "n/a" else f"{ours} ({verdict})"
        rows.append((f"{claim} [paper: {paper}]", cell, None if verdict in ("n/a", "cannot tell") else verdict == "holds"))
    return rows


def _findings_rows(p: dict) -> list[tuple[str, str, bool | None]]:
    a, raw, sh, up = p["activation_summary"]["overall"], p["activation_raw"]["overall"], p["shared"], p["update_summary"]
    cal, paper = up["calibrated"], up["paper"]

    def t(x):
        return ", ".join(f"{g} {x[g]['mean']:.2f}" for g in ("T1", "T2", "T3"))

    return [
        ("usable facts / sampled", f"{p['usable']} / {p['sampled']}", None),
        ("knowledge neurons fire more on held-out paraphrases (T1) than on the same subject (T2) and on "
         "unrelated facts (T3), sign-aligned (means)", t(a), a["order_holds"]),
        ("... with non-overlapping 95% intervals", "yes" if a["separated"] else "no", a["separated"]),
        ("... on raw activations", t(raw), raw["order_holds"]),
        ("facts of one relation share more neurons than facts of different relations",
         f"{num(sh['intra']['common'])} vs {num(sh['inter']['common'])}",
         None if sh["intra"]["common"] is None or sh["inter"]["common"] is None
         else sh["intra"]["common"] > sh["inter"]["common"]),
        ("the calibrated update beats the paper's lambda2 = 8 on efficacy",
         f"{rate(cal['efficacy'], 0)} vs {rate(paper['efficacy'], 0)}",
         None if cal["efficacy"] is None or paper["efficacy"] is None else cal["efficacy"] > paper["efficacy"]),
        ("... and on the control facts' median perplexity ratio",
         f"x{num(cal['ppl_ratio']['median'])} vs x{num(paper['ppl_ratio']['median'])}",
         None if cal["ppl_ratio"]["median"] is None or paper["ppl_ratio"]["median"] is None
         else cal["ppl_ratio"]["median"] < paper["ppl_ratio"]["median"]),
        ("recommended update variant", p["update_default"][0], None),
    ]


def _head(path) -> str:
    try:
        return Path(path).read_text()[:4000]
    except (OSError, UnicodeDecodeError):
        return ""


def compare(paths: list[str | Path]) -> tuple[str, list[str], list[tuple[str, list[str], str]]]:
    """``(kind, models, rows)``; each row: finding, one cell per model, 'yes'/'no'/'mixed'/''."""
    runs = []

    for path in paths:
        if Path(path).is_dir() or Path(path).name == "results.json" and '"protocol": "paper"' in _head(path):
            folder = Path(path) if Path(path).is_dir() else Path(path).parent
            run = load_run(folder)
            runs.append(("pararel", run["model"], _pararel_rows(summarize(run))))
            continue
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise KnowledgeNeuronError(f"cannot read {path} ({exc})") from None
        if "activation_summary" in data:
            runs.append(("findings", data["model"], _findings_rows(data)))
        else:
            raise KnowledgeNeuronError(f"{path} is not the results.json of `kn bench pararel` or `kn bench findings`")
    kinds = {k for k, _, _ in runs}
    if len(kinds) != 1:
        raise KnowledgeNeuronError("compare results of the same benchmark")
    findings = list(dict.fromkeys(f for _, _, rs in runs for f, _, _ in rs))  # rows a run lacks read n/a
    by_run = [{f: (cell, h) for f, cell, h in rs} for _, _, rs in runs]
    rows = []
    for finding in findings:
        cells = [r.get(finding, ("n/a", None))[0] for r in by_run]
        holds = [r.get(finding, ("n/a", None))[1] for r in by_run]
        verdict = "" if any(h is None for h in holds) else "yes" if all(holds) else "no" if not any(holds) else "mixed"
        rows.append((finding, cells, verdict))
    return kinds.pop(), [m for _, m, _ in runs], rows


def write_comparison(paths: list[str | Path], out: str | Path, command: str) -> Path:
    kind, models, rows = compare(paths)
    lines = [f"# {kind}: {' vs '.join(models)}", "", "Side by side, from the runs' `results.json`. Reproduce with:",
             "", "```bash", command, "```", "",
             f"| finding | {' | '.join(models)} | holds on all |", "| --- | " + "--- | " * len(models) + "--- |"]
    lines += [f"| {f} | {' | '.join(cells)} | {v} |" for f, cells, v in rows]
    out = Path(out)
    folders = [Path(p) if Path(p).is_dir() else Path(p).parent for p in paths]
    links = []
    for f in folders:
        try:
            links.append(f"[{f.name}]({(f / 'report.md').resolve().relative_to(out.parent.resolve()).as_posix()})")
        except ValueError:
            links.append(f"{f.as_posix()}/report.md")
    lines += ["", "Runs: " + ", ".join(links), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out
