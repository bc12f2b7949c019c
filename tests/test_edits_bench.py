"""`kn bench edits` end to end on tiny-llama: the cases follow CounterFact's recipe on PARAREL,
the summary equals plain loops over the records, reruns recompute nothing, bad input is one line."""

import json
import shutil
import subprocess
import sys

import pytest
from test_pararel import needs_pararel

from kn_plugin.cli import main

SMALL = ["--model", "tiny-llama", "--edits-per-relation", "2", "--neighbours", "3", "--generation-tokens", "4",
         "--corpus-texts", "12", "--corpus-tokens", "8", "--rome-steps", "3", "--trace-cases", "2", "--quiet"]


def _json(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def edits_run(tiny_protocol_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("edits") / "run"
    assert main(["bench", "edits", "--from", str(tiny_protocol_run), "--out", str(out), *SMALL]) == 0
    return out


def _first(model, text):
    return model.tokenizer(text, add_special_tokens=False)["input_ids"][:1]


@needs_pararel
def test_cases_follow_the_recipe(edits_run, tiny_protocol_run, tiny_models):
    model = tiny_models["tiny-llama"]
    facts = {p.stem: _json(p) for p in (tiny_protocol_run / "facts").glob("*.json")}
    sets = _json(tiny_protocol_run / "results.json")["refined"]["sets"]
    cases = [_json(p) for p in sorted((edits_run / "cases").glob("*.json"))]
    assert cases and len({c["relation"] for c in cases}) >= 2
    for c in cases:
        rec = facts[c["key"]]
        locate = [rec["prompts"][i] for i in rec["locate"]]
        assert c["prompt"] in locate and c["subject"] in c["prompt"]
        assert c["paraphrases"] == [p for i, p in enumerate(rec["prompts"]) if i not in rec["locate"]]
        assert not set(c["paraphrases"]) & set(locate)
        objects = {f["target"] for f in facts.values() if f["relation"] == c["relation"]}
        assert c["target_new"] in objects and _first(model, c["target_new"]) != _first(model, c["target_true"])
        assert c["neurons"] == sets[c["key"]]["kn"] and set(map(tuple, c["kept"])) <= set(map(tuple, c["neurons"]))
        same = {f["key"]: f for f in facts.values() if f["relation"] == c["relation"] and f["counted"]}
        for prompt, answer in c["neighbours"]:
            owner = [f for f in same.values() if prompt in f["prompts"]]
            assert owner and owner[0]["key"] != c["key"] and owner[0]["target"] == answer
            assert _first(model, answer) != _first(model, c["target_new"])
        for prompt, answer in c["others"]:
            owner = [f for f in facts.values() if prompt in f["prompts"] and f["target"] == answer]
            assert owner and owner[0]["relation"] != c["relation"] and owner[0]["counted"]


@needs_pararel
def test_summary_equals_plain_loops_over_the_records(edits_run):
    from scipy.stats import hmean

    s = _json(edits_run / "summary.json")
    cases = {p.stem: _json(p) for p in (edits_run / "cases").glob("*.json")}
    for method in ("kn-paper", "kn-authors", "kn-calibrated", "kn-constrained", "rome"):
        recs = [_json(edits_run / method / f"{k}.json") for k in cases]
        es = sum(r["scores"]["rewrite"][0]["new"] < r["scores"]["rewrite"][0]["true"] for r in recs) / len(recs)
        ps = sum(sum(x["new"] < x["true"] for x in r["scores"]["paraphrase"]) / len(r["scores"]["paraphrase"])
                 for r in recs) / len(recs)
        with_n = [r for r in recs if r["scores"]["neighbourhood"]]
        ns = sum(sum(x["true"] < x["new"] for x in r["scores"]["neighbourhood"]) / len(r["scores"]["neighbourhood"])
                 for r in with_n) / len(with_n)
        got = s["methods"][method]
        assert got["ES"]["value"] == pytest.approx(es) and got["PS"]["value"] == pytest.approx(ps)
        assert got["NS"]["value"] == pytest.approx(ns)
        assert got["S"]["value"] == pytest.approx(hmean([es, ps, ns]) if min(es, ps, ns) > 0 else 0.0)
        rises = [sum(a - b for a, b in zip(r["others"], cases[k]["before"]["others"])) / len(r["others"])
                 for k, r in zip(cases, recs)]
        assert got["inter"]["value"] == pytest.approx(sum(rises) / len(rises))
        for r in recs:  # an edit that was made moved weights; one that was not says why
            assert (r["skipped"] is None) == (r["slots"] > 0) and (r["weight_change"] > 0) == (r["slots"] > 0)
    authors = [_json(edits_run / "kn-authors" / f"{k}.json") for k in cases]
    assert all((r["skipped"] is None) == bool(cases[r["key"]]["kept"]) for r in authors)
    rome = [_json(edits_run / "rome" / f"{k}.json") for k in cases]
    trace = _json(edits_run / "inputs" / "trace.json")
    assert {r["meta"]["layer"] for r in rome} == {trace["layer"]}
    assert trace["layer"] == max(range(len(trace["mean"])), key=trace["mean"].__getitem__)
    assert all(r["slots"] == 48 for r in rome)  # every value slot of the layer (tiny-llama's d_mlp)
    assert "| method | ES | PS | NS | S | GE |" in (edits_run / "report.md").read_text()


@needs_pararel
def test_rerun_recomputes_nothing_and_the_report_comes_from_the_records(edits_run, tiny_protocol_run, tmp_path,
                                                                       monkeypatch, capsys):
    import kn_plugin.bench.edits as edits

    copy = tmp_path / "copy"
    shutil.copytree(edits_run, copy)
    stamps = {p: p.stat().st_mtime_ns for p in copy.rglob("*.json") if p.parent != copy}

    def no(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(edits, "measure_case", no)
    monkeypatch.setattr(edits, "edit_task", no)
    monkeypatch.setattr(edits, "_setup", no)
    assert main(["bench", "edits", "--from", str(tiny_protocol_run), "--out", str(copy), *SMALL]) == 0
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*.json") if p.parent != copy} == stamps
    assert _json(copy / "summary.json") == _json(edits_run / "summary.json")
    (copy / "summary.json").unlink()
    (copy / "report.md").unlink()
    assert main(["bench", "edits-report", str(copy)]) == 0
    assert _json(copy / "summary.json") == _json(edits_run / "summary.json")
    capsys.readouterr()
    assert main(["bench", "edits", "--from", str(tiny_protocol_run), "--out", str(copy), *SMALL,
                 "--neighbours", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kn: error:") and "other settings" in err and len(err.strip().splitlines()) == 1
    # a record that is not the one the manifest names is refused by the report
    path = sorted((copy / "kn-paper").glob("*.json"))[0]
    rec = _json(path)
    rec["input"] = "0" * 16
    path.write_text(json.dumps(rec))
    assert main(["bench", "edits-report", str(copy)]) == 2
    assert "belongs to other inputs" in capsys.readouterr().err


@needs_pararel
def test_bad_input_is_one_line(tiny_protocol_run, tmp_path):
    def error(args, match):
        proc = subprocess.run([sys.executable, "-m", "kn_plugin.cli", "bench", "edits", *args],
                              capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("kn: error:") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert match in proc.stderr, proc.stderr

    src = str(tiny_protocol_run)
    error(["--from", src, "--out", str(tmp_path / "a"), "--model", "tiny-gpt2"], "another model")
    error(["--from", src, "--out", str(tmp_path / "b"), "--model", "tiny-llama", "--rome-layer", "9"], "layer")
    error(["--from", src, "--out", str(tmp_path / "c"), "--model", "tiny-llama", "--methods", "kn-paper,memit"],
          "unknown edit methods")
    error(["--from", str(tmp_path), "--out", str(tmp_path / "d"), "--model", "tiny-llama"], "no results")
    error(["--from", src, "--out", src, "--model", "tiny-llama"], "--from folder")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
