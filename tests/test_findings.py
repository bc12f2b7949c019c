"""The paper's remaining findings: T1/T2/T3 activation analysis, shared neurons, the update sweep."""

import json
import math
import random

import pytest
import torch
from test_pararel import PARAREL, needs_pararel

import kn_plugin.bench.findings as findings
from kn_plugin.bench.findings import (
    FindingsConfig,
    activation_task,
    bootstrap_ci,
    neuron_activations,
    shared_neurons,
    summarize_activation,
)
from kn_plugin.bench.update_sweep import choose_default
from kn_plugin.cli import main
from kn_plugin.editing import calibrated_update, update_fact
from kn_plugin.evaluation import spread
from kn_plugin.scoring import encode_fact, top_prediction


def test_spread_by_hand():
    s = spread([1.0, 4.0, 16.0, 1e6])
    assert s["median"] == 10.0 and s["mean"] == pytest.approx((1 + 4 + 16 + 1e6) / 4)
    assert s["geometric"] == pytest.approx((1 * 4 * 16 * 1e6) ** 0.25)
    assert spread([])["median"] is None


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    rng = random.Random(1)
    values = [rng.gauss(2.0, 1.0) for _ in range(40)]
    mean, lo, hi = bootstrap_ci(values, 500, seed=3)
    assert mean == pytest.approx(sum(values) / len(values)) and lo < mean < hi
    assert bootstrap_ci(values, 500, seed=3) == (mean, lo, hi)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_neuron_activations_equal_a_plain_hook(tiny_models, name):
    model = tiny_models[name]
    prompt, target = ("The capital of France is [MASK] .", "paris") if model.is_masked else \
        ("The capital of France is", " Paris")
    fact = encode_fact(model, prompt, target)
    neurons = [(0, 3), (1, 5), (model.n_layers - 1, 7)]
    seen = {}
    handles = [model.adapter.patch_site(layer, lambda a, layer=layer: seen.setdefault(layer, a.detach().clone()))
               for layer in range(model.n_layers)]
    try:
        with torch.no_grad():
            model.hf_model(fact.input_ids)
    finally:
        for h in handles:
            h.remove()
    expected = [seen[layer][0, fact.pred_pos, i].item() for layer, i in neurons]
    assert neuron_activations(model, prompt, target, neurons) == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_synthetic_case_gives_t1_above_t2_above_t3(monkeypatch):
    """A stand-in model whose 'neurons' fire with how much of the fact a prompt expresses."""
    def fake(model, prompt, target, neurons):
        words = set(prompt.lower().split())
        return [2.0 * ("capital" in words) + 1.0 * ("france" in words) + 0.01 * len(words)] * len(neurons)

    monkeypatch.setattr(findings, "neuron_activations", fake)
    rows = []
    for k in range(12):
        rec = {"key": f"f{k}", "relation": "P36" if k % 2 else "P1376", "target": " Paris",
               "neurons": [[1, 2, 0.5], [2, 3, 0.1]],
               "locate_prompts": ["The capital city of France is"],
               "held_prompts": ["The capital of France is", "France's capital city is"]}
        pools = {"T2": [("France is located in", " Europe"), ("The official language of France is", " French")],
                 "T3": [("Dante was born in", " Florence"), ("The Nile flows into the", " Mediterranean")]}
        rows.append(activation_task(None, rec, pools))
    summary = summarize_activation(rows, n_boot=300, seed=0)
    o = summary["overall"]
    assert o["T1"]["mean"] > o["T2"]["mean"] > o["T3"]["mean"]
    assert o["order_holds"] and o["separated"]
    assert all(t["order_holds"] for t in summary["per_relation"].values())
    assert summarize_activation(rows, n_boot=100, suffix="_raw")["overall"]["order_holds"]  # all signs positive
    swapped = [{**r, "T1": r["T3"], "T3": r["T1"]} for r in rows]
    assert not summarize_activation(swapped, n_boot=100)["overall"]["order_holds"]


def test_sign_alignment_flips_neurons_that_fire_negatively(monkeypatch):
    values = {"locate": [-2.0, 1.0], "held": [-3.0, 1.0], "other": [1.0, 0.0], "far": [0.5, 0.5]}
    monkeypatch.setattr(findings, "neuron_activations", lambda m, p, t, n: values[p])
    rec = {"key": "k", "relation": "R", "target": " x", "neurons": [[0, 1, 1.0], [0, 2, 1.0]],
           "locate_prompts": ["locate"], "held_prompts": ["held"]}
    row = activation_task(None, rec, {"T2": [("other", " x")], "T3": [("far", " x")]})
    assert row["signs"] == [-1.0, 1.0]
    assert row["T1"] == [2.0] and row["T1_raw"] == [-1.0]  # (3 + 1) / 2 aligned, (-3 + 1) / 2 raw
    assert row["T2"] == [-0.5] and row["T3"] == [0.0]


def test_shared_neurons_by_hand():
    recs = [{"relation": "A", "neurons": [[1, 1, 0.0], [1, 2, 0.0]]},
            {"relation": "A", "neurons": [[1, 1, 0.0], [2, 2, 0.0]]},
            {"relation": "B", "neurons": [[3, 3, 0.0]]}]
    s = shared_neurons(recs)
    assert s["intra"] == {"pairs": 1, "common": 1.0, "jaccard": pytest.approx(1 / 3)}
    assert s["inter"]["pairs"] == 2 and s["inter"]["common"] == 0.0
    assert s["neurons_per_fact"] == pytest.approx(5 / 3)


def test_calibrated_update_is_the_smallest_lambda_that_works(tiny_models):
    model = tiny_models["tiny-llama"]
    prompts = ["The capital of France is", "The capital city of France is"]
    neurons = [(model.n_layers - 1, i) for i in range(12)]
    ladder = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0)
    before = [p.detach().clone() for p in model.hf_model.parameters()]
    edit, lam, reached = calibrated_update(model, neurons, " Paris", " Rome", prompts, ladder=ladder)
    assert all(torch.equal(a, b) for a, b in zip(before, model.hf_model.parameters()))  # left unedited
    facts = [encode_fact(model, p, " Paris") for p in prompts]
    rome = model.tokenizer(" Rome", add_special_tokens=False)["input_ids"][0]
    first_ok = None
    for x in ladder:  # brute force over the ladder
        with update_fact(model, neurons, " Paris", " Rome", lambda2=x, prompts=prompts).applied(model):
            if all(top_prediction(model, f) == rome for f in facts):
                first_ok = x
                break
    assert reached == (first_ok is not None)
    if reached:
        assert lam == first_ok and edit.meta["lambda2"] == first_ok
    else:
        assert lam == ladder[-1]


def test_choose_default_prefers_specificity_at_similar_efficacy():
    def v(eff, intra, inter, ratio):
        return {"facts": 5, "efficacy": eff, "intra_unchanged": intra, "inter_unchanged": inter,
                "ppl_ratio": {"median": ratio}}

    summary = {"paper": v(1.0, 0.2, 0.3, 50.0), "authors": v(0.4, 0.9, 0.9, 1.1), "calibrated": v(0.95, 0.8, 0.9, 1.3)}
    assert choose_default(summary)[0] == "calibrated"
    summary["calibrated"] = v(0.5, 0.8, 0.9, 1.3)
    assert choose_default(summary)[0] == "paper"


def test_findings_config_is_checked():
    with pytest.raises(Exception, match="at least 2 prompts"):
        FindingsConfig(locate_prompts=1)


@needs_pararel
def test_bench_findings_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "f"
    args = ["bench", "findings", "--model", "tiny-llama", "--pararel", str(PARAREL), "--relations", "P36,P1376,P30",
            "--facts-per-relation", "4", "--max-rank", "400", "--steps", "5", "--inspect", "2",
            "--inspect-sentences", "40", "--out", str(out), "--quiet"]
    assert main(args) == 0
    for name in ("report.md", "results.json", "activation.png", "inspect.json"):
        assert (out / name).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    assert res["usable"] >= 4 and set(res["update_summary"]) == {"paper", "authors", "calibrated"}
    t = res["activation_summary"]["overall"]
    assert all(not math.isnan(t[g]["mean"]) for g in ("T1", "T3"))
    assert len(res["inspect"]) == 2 and all(len(e["top_sentences"]) > 0 for e in res["inspect"])
    report = (out / "report.md").read_text()
    assert "kn bench findings" in report and "| calibrated |" in report and "T1 > T2 > T3" in report
    # side by side (here the same run twice: every verdict is "yes", "no" or blank, never "mixed")
    md = tmp_path / "both.md"
    assert main(["bench", "compare", str(out / "results.json"), str(out / "results.json"), "--report", str(md)]) == 0
    table = md.read_text()
    assert "| tiny-llama | tiny-llama | holds on all |" in table and "mixed" not in table
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.parent != out}
    assert main(args) == 0  # resumable: nothing recomputed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.parent != out} == mtimes
    other = [a if a != "5" else "6" for a in args]  # --steps 6: refused, not mixed with the m = 5 records
    capsys.readouterr()
    assert main(other) == 2
    assert "other settings (steps)" in capsys.readouterr().err
