import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kn_plugin.data import cloze_prompt, load_pararel, pararel_dir, read_facts_jsonl
from kn_plugin.errors import KnowledgeNeuronError

PARAREL = Path(os.environ.get("KN_PARAREL", Path(__file__).resolve().parents[2] / "shared" / "pararel"))
# skipped where PARAREL is absent, except in CI, which always has it beside the checkout
needs_pararel = pytest.mark.skipif(not (PARAREL / "patterns").is_dir() and not os.environ.get("CI"),
                                   reason=f"no PARAREL at {PARAREL}")


def test_cloze_prompts():
    assert cloze_prompt("The capital of [X] is [Y] .", "France", masked=False) == "The capital of France is"
    assert cloze_prompt("[Y] is the capital of [X].", "France", masked=False) is None
    assert cloze_prompt("[X] was a [Y]-born person.", "Dante", masked=False) is None
    assert cloze_prompt("[Y] is the capital of [X].", "France", masked=True) == "[MASK] is the capital of France."


@needs_pararel
def test_loader_filters_and_samples_deterministically():
    data = load_pararel(PARAREL, facts_per_relation=5, seed=3)
    again = load_pararel(PARAREL, facts_per_relation=5, seed=3)
    assert data == again and len(data) >= 25
    for rel, facts in data.items():
        patterns = (PARAREL / "patterns" / f"{rel}.jsonl").read_text().splitlines()
        assert len([p for p in patterns if p.strip()]) > 3
        assert len(facts) == 5 and all(len(f.prompts) >= 2 for f in facts)
        assert all(f.target.startswith(" ") and not p.endswith(" ") for f in facts for p in f.prompts)
    other = load_pararel(PARAREL, relations=["P36"], facts_per_relation=5, seed=4)
    assert [f.index for f in other["P36"]] != [f.index for f in data["P36"]]
    masked = load_pararel(PARAREL, relations=["P36"], masked=True, facts_per_relation=2)
    assert all("[MASK]" in p for f in masked["P36"] for p in f.prompts)


@needs_pararel
def test_single_token_filter(tiny_models):
    tok = tiny_models["tiny-llama"].tokenizer
    kept = load_pararel(PARAREL, relations=["P36"], facts_per_relation=30, tokenizer=tok, single_token=True)
    every = load_pararel(PARAREL, relations=["P36"], facts_per_relation=30)
    assert all(len(tok(f.target, add_special_tokens=False)["input_ids"]) == 1 for f in kept.get("P36", []))
    assert len(kept.get("P36", [])) < len(every["P36"])
    with pytest.raises(KnowledgeNeuronError, match="tokenizer"):
        load_pararel(PARAREL, relations=["P36"], single_token=True)


def test_loader_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("KN_PARAREL", raising=False)
    with pytest.raises(KnowledgeNeuronError, match="PARAREL folder"):
        pararel_dir(None)
    with pytest.raises(KnowledgeNeuronError, match="not a PARAREL folder"):
        pararel_dir(tmp_path)
    bad = tmp_path / "f.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(KnowledgeNeuronError, match="f.jsonl:1"):
        read_facts_jsonl(bad)


ARGS = ["bench", "pararel", "--model", "tiny-llama", "--pararel", str(PARAREL), "--relations",
        "P36,P19,P101,P1376", "--facts-per-relation", "8", "--max-rank", "400", "--update-facts", "2", "--quiet"]


def _fact_records(out: Path) -> dict:
    recs = {}
    for path in sorted((out / "facts").glob("*.json")):
        rec = json.loads(path.read_text())
        rec.pop("seconds")
        recs[path.stem] = rec
    return recs


def _summary(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    s.pop("seconds")
    return s


@needs_pararel
def test_killed_benchmark_resumes_with_identical_results(tiny_protocol_run, tmp_path):
    ref, resumed = tiny_protocol_run, tmp_path / "resumed"  # ref: the uninterrupted run of ARGS
    expected = _fact_records(ref)
    assert len(expected) >= 20 and sum(r["counted"] for r in expected.values()) >= 10

    cmd = [sys.executable, "-m", "kn_plugin.cli", *ARGS, "--out", str(resumed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list((resumed / "facts").glob("*.json"))) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    done_at_kill = len(list((resumed / "facts").glob("*.json")))
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 0 < done_at_kill < len(expected)
    assert not (resumed / "results.json").exists()

    assert subprocess.run(cmd, capture_output=True).returncode == 0
    got = _fact_records(resumed)
    assert got.keys() == expected.keys()  # no fact lost
    for key in expected:
        assert got[key].get("ig_coarse") == expected[key].get("ig_coarse"), key
        assert got[key]["prob"] == pytest.approx(expected[key]["prob"], rel=1e-6)
    a = json.loads((ref / "results.json").read_text())
    b = json.loads((resumed / "results.json").read_text())
    assert a["records"] == b["records"]  # the same records, each named once by the content of its inputs
    keys = [k for keys in b["relations"].values() for k in keys]
    assert len(keys) == len(set(keys)) == len(expected)
    assert _summary(resumed) == _summary(ref)
    assert (resumed / "report.md").read_text().count("| P") == (ref / "report.md").read_text().count("| P")
