"""The paper's definitions (as the released code fixes them) against hand computations, the
statistics against scipy and plain resampling, and `kn bench pararel` end to end on tiny-llama."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FACTS
from hypothesis import given, settings
from hypothesis import strategies as st
from test_pararel import ARGS, PARAREL, needs_pararel

from kn_plugin import paper
from kn_plugin.bench.pararel_summary import inside
from kn_plugin.cli import main
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.stats import cluster_interval, jaccard, order_verdict, paired_test, sign_verdict

# --- definitions ------------------------------------------------------------------------------

ROWS = [  # two relations; per-prompt probabilities before and after
    {"relation": "A", "before": [0.2, 0.4], "after": [0.1, 0.1]},
    {"relation": "A", "before": [0.6], "after": [0.3]},
    {"relation": "B", "before": [0.5, 0.5, 0.2], "after": [0.6, 0.6, 0.3]},
]


def test_relation_mean_is_the_mean_over_relations_of_the_ratio_of_means():
    # A: mean before (0.2+0.4+0.6)/3 = 0.4, after 0.5/3; B: before 0.4, after 0.5
    a = (0.5 / 3 - 0.4) / 0.4
    b = (0.5 - 0.4) / 0.4
    assert paper.per_relation(ROWS, "before", "after") == pytest.approx({"A": a, "B": b})
    assert paper.relation_mean(ROWS, "before", "after") == pytest.approx((a + b) / 2)
    # pooled: every prompt of every relation at once
    before = [0.2, 0.4, 0.6, 0.5, 0.5, 0.2]
    after = [0.1, 0.1, 0.3, 0.6, 0.6, 0.3]
    assert paper.pooled(ROWS, "before", "after") == pytest.approx((sum(after) - sum(before)) / sum(before))
    changes = sorted(y / x - 1 for x, y in zip(before, after))
    assert paper.prompt_median(ROWS, "before", "after") == pytest.approx((changes[2] + changes[3]) / 2)
    assert paper.ratio_of_means([], []) is None and paper.ratio_of_means([0.0], [0.1]) is None
    with pytest.raises(KnowledgeNeuronError):
        paper.ratio_of_means([0.1], [0.1, 0.2])


def _bag(*sets):
    return [[(0, i) for i in s] for s in sets]


def test_bag_neurons_needs_max_of_share_and_the_three_prompt_floor():
    bag = _bag([1, 2, 3], [1, 2], [1, 4], [1, 2, 5])  # counts: 1 -> 4, 2 -> 3, others 1
    assert paper.bag_neurons(bag, 0.7) == [(0, 1), (0, 2)]  # max(2.8, 3) = 3
    assert paper.bag_neurons(bag, 0.9) == [(0, 1)]  # 3.6
    assert paper.bag_neurons(bag, 0.1) == [(0, 1), (0, 2)]  # floor 3 although 0.4 < 1
    assert paper.bag_neurons(bag, 0.1, min_sharing=1) == [(0, i) for i in range(1, 6)]
    assert paper.bag_neurons(_bag([1], [1]), 0.5) == []  # two prompts never reach the floor


def test_relation_level_p_is_tuned_on_the_mean_set_size():
    # 10 prompts per bag; neuron i of bag b is shared by counts[i] prompts
    def bag(counts):
        return [[(0, i) for i, c in enumerate(counts) if k < c] for k in range(10)]

    big = bag([10, 10, 9, 9, 8, 8, 8, 7, 7])  # at p = 0.7 (need 7): 9 neurons
    small = bag([10, 9, 8])  # 3 neurons
    sets, used, mean = paper.tune_relation([big, small])
    # p = 0.7: sizes 9, 3 -> mean 6 > 5: raise p; p = 0.75 (need 7.5 -> 8): 7, 3 -> 5: in range
    assert used == pytest.approx(0.75) and mean == 5.0
    assert [len(s) for s in sets] == [7, 3]
    # by hand, per bag at the p found
    assert sets == [paper.bag_neurons(big, 0.75), paper.bag_neurons(small, 0.75)]
    # too small everywhere: p falls 0.7 -> 0.45 in 6 tries and the last p tried is kept
    tiny = bag([4, 4])
    sets, used, mean = paper.tune_relation([tiny])
    assert used == pytest.approx(0.45) and mean == 0.0  # at 0.45 a neuron needs 4.5 of 10 prompts
    with pytest.raises(KnowledgeNeuronError):
        paper.tune_relation([])


def test_tune_relation_sets_at_p_equal_the_hand_loop():
    rng = random.Random(3)
    for _ in range(30):
        bags = [[[(0, i) for i in range(12) if rng.random() < 0.3 + 0.05 * i] for _ in range(rng.randint(3, 9))]
                for _ in range(rng.randint(1, 4))]
        sets, used, mean = paper.tune_relation(bags)
        # the loop written out: p from 0.7, step 0.05, 6 tries, stop in [2, 5]
        p = 0.7
        for _ in range(6):
            got = []
            for b in bags:
                need = max(p * len(b), 3)
                counts = {}
                for s in b:
                    for n in set(s):
                        counts[n] = counts.get(n, 0) + 1
                got.append(sorted(n for n, c in counts.items() if c >= need))
            m = sum(map(len, got)) / len(got)
            last = p
            if 2 <= m <= 5:
                break
            p = round(p - 0.05, 10) if m < 2 else round(p + 0.05, 10)
        assert sets == got and used == pytest.approx(last) and mean == pytest.approx(m)


def test_update_rates_skip_prompts_answered_wrongly_before():
    old, new, other = 7, 9, 3
    before = [old, old, other, old, new]  # prompts 2 and 4 answered wrongly: not counted
    after = [new, old, new, other, new]
    r = paper.update_rates(before, after, old, new)
    assert r == {"prompts": 3, "change": pytest.approx(2 / 3), "success": pytest.approx(1 / 3)}
    assert paper.update_rates([other], [new], old, new) == {"prompts": 0, "change": None, "success": None}


def test_controls_never_hold_the_edited_fact_nor_the_new_object():
    cands = [{"key": f"k{i}", "target": t} for i, t in enumerate([" Paris", " Rome", " Rome", " Oslo", " Bern"])]
    for seed in range(20):
        got = paper.control_facts(cands, "k0", " Rome", 5, random.Random(seed))
        assert {c["key"] for c in got} == {"k3", "k4"}
        assert len(paper.control_facts(cands, "k3", " Paris", 2, random.Random(seed))) == 2


def test_update_neurons_leave_out_those_of_many_bags():
    # 30 bags: (0, 1) in 1, (0, 2) in 2, (0, 3) in 3; the released code counts 1 + bags holding
    # a neuron and keeps it while that is <= 0.1 x 30 = 3
    bags = [[(0, 1), (0, 2), (0, 3)], [(0, 2), (0, 3)], [(0, 3)]] + [[(1, 5)]] * 27
    assert paper.update_neurons([(0, 1), (0, 2), (0, 3)], bags) == [(0, 1), (0, 2)]
    assert paper.update_neurons([(0, 1), (0, 2), (0, 3)], bags[:20]) == [(0, 1)]  # limit 2


def test_top_shared_takes_the_commonest_neurons():
    sets = [[(0, 1), (0, 2)], [(0, 2), (1, 3)], [(0, 2), (1, 3)], [(2, 2)]]
    assert paper.top_shared(sets, 2) == [(0, 2), (1, 3)]


def test_coarse_set_is_the_threshold_of_the_maximum():
    v = torch.tensor([[0.1, 1.0, -2.0], [0.2, 0.19, 0.5]])
    assert paper.coarse_set(v, 0.2) == [(0, 1), (1, 0), (1, 2)]
    assert paper.coarse_set(-v.abs(), 0.2) == []


# --- statistics -------------------------------------------------------------------------------

def _mean(units):
    return sum(u["x"] for u in units) / len(units) if units else None


def test_cluster_bootstrap_is_seeded_and_resamples_whole_clusters():
    rng = random.Random(0)
    units = [{"x": c * 10 + rng.random(), "c": c} for c in range(6) for _ in range(rng.randint(1, 4))]
    clusters = [u["c"] for u in units]
    a = cluster_interval(units, clusters, _mean, seed=5)
    b = cluster_interval(units, clusters, _mean, seed=5)
    c = cluster_interval(units, clusters, _mean, seed=6)
    assert a == b and a != c
    assert a["low"] <= a["value"] <= a["high"] and a["clusters"] == 6 and a["n"] == len(units)
    assert a["value"] == pytest.approx(_mean(units))
    # against a plain loop of cluster resamples: the percentile interval is close
    members = {k: [u for u in units if u["c"] == k] for k in range(6)}
    gen = np.random.default_rng(1)
    stats = sorted(_mean([u for k in gen.integers(0, 6, 6) for u in members[int(k)]]) for _ in range(4000))
    assert a["low"] == pytest.approx(stats[100], abs=2.0) and a["high"] == pytest.approx(stats[3899], abs=2.0)
    # one unit per cluster with the same value everywhere: no spread
    flat = cluster_interval([{"x": 1.0}] * 4, [0, 1, 2, 3], _mean)
    assert flat["value"] == 1.0 and (flat["low"] is None or flat["low"] == flat["high"] == 1.0)
    assert cluster_interval(units[:2], [0, 0], _mean)["low"] is None  # one cluster: no interval


def test_cluster_bootstrap_is_wider_than_a_unit_bootstrap_when_clusters_differ():
    units = [{"x": float(c)} for c in range(5) for _ in range(20)]
    clustered = cluster_interval(units, [u["x"] for u in units], _mean)
    naive = cluster_interval(units, list(range(len(units))), _mean)
    assert clustered["high"] - clustered["low"] > 2 * (naive["high"] - naive["low"])


def test_paired_test_matches_scipy_and_counts_signs():
    from scipy.stats import binomtest, wilcoxon

    a = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.2]
    b = [0.4, 0.3, 0.1, 0.3, 0.1, 0.1, 0.0]
    t = paired_test(a, b)
    d = np.array(a) - np.array(b)
    d = d[d != 0]
    assert t["greater"] == 5 and t["less"] == 1 and t["n"] == 7
    assert t["wilcoxon_p"] == pytest.approx(wilcoxon(d).pvalue)
    assert t["sign_p"] == pytest.approx(binomtest(5, 6).pvalue)
    assert order_verdict(t, "greater") == "cannot tell"  # p > 0.05 on 6 pairs
    strong = paired_test(list(range(1, 21)), [0] * 20)
    assert order_verdict(strong, "greater") == "holds" and order_verdict(strong, "less") == "does not hold"
    assert sign_verdict({"low": -0.3, "high": -0.1}, "negative") == "holds"
    assert sign_verdict({"low": -0.3, "high": 0.1}, "negative") == "cannot tell"
    assert sign_verdict({"low": 0.1, "high": 0.2}, "negative") == "does not hold"
    assert inside({"low": 0.6, "high": 0.8}, 0.485) == "higher than the paper"
    assert inside({"low": 0.2, "high": 0.3}, 0.344) == "lower than the paper"
    assert inside({"low": 0.2, "high": 0.4}, 0.344) == "holds" and inside({"value": 0.3}, 0.3) == "cannot tell"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 1), st.floats(0, 1)), min_size=1, max_size=12),
       st.lists(st.sampled_from("ABC"), min_size=12, max_size=12))
def test_relation_mean_equals_a_plain_loop(pairs, rels):
    rows = [{"relation": r, "before": [b], "after": [a]} for (b, a), r in zip(pairs, rels)]
    by = {}
    for r in rows:
        by.setdefault(r["relation"], []).append((r["before"][0], r["after"][0]))
    expect = [(np.mean([a for _, a in v]) - np.mean([b for b, _ in v])) / np.mean([b for b, _ in v]) for v in by.values()]
    assert paper.relation_mean(rows, "before", "after") == pytest.approx(np.mean(expect))


# --- interventions ------------------------------------------------------------------------------

def test_variant_probs_equal_one_intervention_at_a_time(tiny_models):
    from kn_plugin.evaluation import intervened_probs, target_probs, variant_probs
    from kn_plugin.scoring import encode_fact

    for name in ("tiny-llama", "tiny-gpt2", "tiny-bert"):
        model = tiny_models[name]
        fact = encode_fact(model, *FACTS[name])
        groups = [[], [(0, 1), (1, 3)], [(1, 0)], [(0, 1), (0, 2), (1, 5)]]
        variants = [(g, f) for g in groups for f in (0.0, 2.0)]
        probs, tops = variant_probs(model, fact, variants)
        for (g, f), p in zip(variants, probs):
            want = intervened_probs(model, [fact], g, f)[0] if g else target_probs(model, [fact])[0]
            assert p == pytest.approx(want, rel=1e-4, abs=1e-7), (name, g, f)
        assert len(tops) == len(variants)


def test_random_control_refuses_a_set_covering_most_of_a_layer():
    from kn_plugin.evaluation import random_neurons

    got = random_neurons([(0, i) for i in range(4)] + [(1, 2)], 10, seed=1)
    assert sorted(n[0] for n in got) == [0, 0, 0, 0, 1] and not {(0, i) for i in range(4)} & set(got)
    with pytest.raises(KnowledgeNeuronError, match="random control is undefined"):
        random_neurons([(0, i) for i in range(6)], 10)


# --- the benchmark end to end ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tiny_protocol_run):
    return tiny_protocol_run


def _json(path):
    return json.loads(path.read_text())


@needs_pararel
def test_held_out_prompts_are_never_locate_prompts(tiny_run, monkeypatch):
    facts = {p.stem: _json(p) for p in (tiny_run / "facts").glob("*.json")}
    located = [r for r in facts.values() if r.get("ig_coarse") is not None]
    assert located
    for r in located:
        assert len(r["locate"]) == len(r["ig_coarse"]) == 3 and len(set(r["locate"])) == 3
        assert len(r["prompts"]) > 3
    from kn_plugin.bench.pararel_summary import _split

    for path in (tiny_run / "effects").glob("*.json"):
        e = _json(path)
        held, ins = _split(e, "held_out"), _split(e, "in_sample")
        n = len(e["before"])
        assert len(held["before"]) == n - 3 and len(ins["before"]) == 3
        assert held["before"] == [e["before"][i] for i in range(n) if i not in e["locate"]]
    # the locate step sees exactly the locate prompts
    import kn_plugin.bench.pararel_tasks as tasks
    from kn_plugin.bench.pararel_data import ParaRelConfig, pararel_protocol_data
    from kn_plugin.bench.pararel_tasks import fact_task
    from kn_plugin.models import load_model

    seen = []
    real = tasks.locate_quietly
    monkeypatch.setattr(tasks, "locate_quietly", lambda m, prompts, t, **k: seen.append(prompts) or real(m, prompts, t, **k))
    model = load_model("tiny-llama")
    config = ParaRelConfig(max_rank=400)
    data = pararel_protocol_data(model, PARAREL, ["P36"], 2, config)
    for f in data["P36"]:
        rec = fact_task(model, f, config)
        assert seen[-1] == [rec["prompts"][i] for i in rec["locate"]]
        assert not set(seen[-1]) & {p for i, p in enumerate(rec["prompts"]) if i not in rec["locate"]}


@needs_pararel
def test_report_is_recomputed_from_the_records_alone(tiny_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    (copy / "report.md").unlink()
    (copy / "summary.json").unlink()
    assert main(["bench", "pararel-report", str(copy)]) == 0
    assert _json(copy / "summary.json") == _json(tiny_run / "summary.json")
    report = (copy / "report.md").read_text()
    assert "| claim | this model [95% CI] | paper (BERT-base) | verdict |" in report
    assert "-29.0%" in report and "4.13" in report and "Where this departs" in report
    # a record that does not belong to the manifest is refused, not summarised
    path = sorted((copy / "effects").glob("*.json"))[0]
    rec = _json(path)
    rec["input"] = "0" * 16
    path.write_text(json.dumps(rec))
    proc = subprocess.run([sys.executable, "-m", "kn_plugin.cli", "bench", "pararel-report", str(copy)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("kn: error:") and len(proc.stderr.splitlines()) == 1
    md = tmp_path / "both.md"
    assert main(["bench", "pararel-report", str(tiny_run), "--compare", str(md)]) == 0
    assert "[paper: -29.0%]" in md.read_text()


def _no_compute(monkeypatch, allowed=()):
    import kn_plugin.bench.pararel as pararel

    real = pararel.run_tasks

    def guarded(model, task, todo, pool):
        todo = list(todo)
        assert not todo or task.__name__ in allowed, f"recomputed {len(todo)} {task.__name__} records"
        return real(model, task, todo, pool)

    monkeypatch.setattr(pararel, "run_tasks", guarded)


@needs_pararel
def test_rerun_recomputes_nothing_and_other_settings_are_refused(tiny_run, monkeypatch, capsys):
    before = {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*.json") if p.parent != tiny_run}
    _no_compute(monkeypatch)
    assert main(ARGS + ["--out", str(tiny_run)]) == 0
    assert {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*.json") if p.parent != tiny_run} == before
    capsys.readouterr()
    for extra in (["--steps", "7"], ["--locate-prompts", "4"], ["--seed", "1"]):
        assert main(ARGS + ["--out", str(tiny_run)] + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("kn: error:") and len(err.splitlines()) == 1 and "other settings" in err, err


@needs_pararel
def test_growing_a_run_reuses_its_records(tiny_run, tmp_path, monkeypatch):
    import shutil

    grown = tmp_path / "grown"
    shutil.copytree(tiny_run, grown)
    small = [a if a != "8" else "4" for a in ARGS]
    # the draw of 4 facts is part of the draw of 8: only the cheap stages that draw from the
    # other facts (unrelated facts, update controls, erase samples) may change
    _no_compute(monkeypatch, allowed=("unrelated_task", "update_task", "erase_task"))
    assert main(small + ["--out", str(grown)]) == 0
    small_run, big_run = _json(grown / "results.json")["records"], _json(tiny_run / "results.json")["records"]
    for stage in ("facts", "effects"):
        assert small_run[stage].items() <= big_run[stage].items()


@needs_pararel
def test_bad_selections_are_one_line(tmp_path, capsys):
    base = ["bench", "pararel", "--model", "tiny-llama", "--pararel", str(PARAREL), "--out", str(tmp_path / "o"),
            "--quiet"]

    def error(extra, match):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("kn: error:") and len(err.splitlines()) == 1 and match in err, err

    error(["--relations", "P36", "--locate-prompts", "40"], "have no usable fact")  # k larger than the prompts
    error(["--relations", "P103"], "have no usable fact")  # 2 usable templates for a causal model
    error(["--relations", "P36,P9999"], "unknown PARAREL relations")
    error(["--relations", ","], "names no relation")
    error(["--relations", "P36,P36"], "twice")
    error(["--relations", "P36", "--locate-prompts", "2"], "below the 3 prompts")
    error(["--relations", "P36", "--facts-per-relation", "0"], ">= 1")
    assert not (tmp_path / "o").exists()  # nothing written


def test_update_and_erase_tasks_measure_and_undo(tiny_models):
    from kn_plugin.bench.pararel_data import ParaRelConfig
    from kn_plugin.bench.pararel_tasks import erase_task, update_task
    from kn_plugin.evaluation import predictions
    from kn_plugin.scoring import encode_fact

    model = tiny_models["tiny-llama"]
    prompts = ["The capital of France is", "France's capital is", "The capital city of France is"]
    facts = [encode_fact(model, p, " Paris") for p in prompts]
    tops = predictions(model, facts)[0]
    target = model.tokenizer.decode([tops[0]])  # what the model answers on the first prompt
    rec = {"key": "k", "relation": "R", "target": target, "prompts": prompts,
           "top": [t == encode_fact(model, p, target).target_ids[0] for t, p in zip(tops, prompts)]}
    new = next(c for c in (" Berlin", " Madrid", " Oslo") if c != target)
    controls = [{"key": "c", "target": " Rome", "prompts": ["The capital of Italy is"]}]
    before = model.identity()
    config = ParaRelConfig()
    out = update_task(model, rec, [[0, 1], [1, 2]], new, controls, controls, config)
    assert model.identity() == before  # the edit is undone
    assert out["answered"] == [p for p, t in zip(prompts, rec["top"]) if t] and rec["top"][0]
    # change and success by hand, over the prompts answered right before the edit
    old_id = encode_fact(model, prompts[0], target).target_ids[0]
    new_id = encode_fact(model, prompts[0], new).target_ids[0]
    kept = [a for b, a in zip(out["before"]["top"], out["after"]["top"]) if b == old_id]
    assert out["change"] == pytest.approx(sum(a != old_id for a in kept) / len(kept))
    assert out["success"] == pytest.approx(sum(a == new_id for a in kept) / len(kept))
    assert len(out["before"]["intra_log_ppl"]) == 1
    er = erase_task(model, "R", [[0, 1], [1, 3]], [rec], controls, config)
    assert model.identity() == before
    assert len(er["before"]["relation"]["log_ppl"]) == 3 and len(er["after"]["other"]["log_ppl"]) == 1
    assert er["before"]["relation"]["log_ppl"] != er["after"]["relation"]["log_ppl"]
    with pytest.raises(KnowledgeNeuronError, match="must be >= 0"):
        update_task(model, rec, [[0, 1]], new, [], [], ParaRelConfig(lambda2=-1.0))


@needs_pararel
def test_convergence_sets_two_runs_of_the_same_facts_side_by_side(tiny_run, tmp_path, capsys):
    import shutil

    conv = tmp_path / "converged"
    assert main(ARGS + ["--out", str(conv), "--converged"]) == 0
    md = tmp_path / "convergence.md"
    assert main(["bench", "convergence", str(tiny_run), str(conv), "--report", str(md)]) == 0
    got = _json(md.with_suffix(".json"))
    sets = [_json(f / "results.json")["refined"]["sets"] for f in (tiny_run, conv)]
    both = [k for k in sets[0] if sets[0][k].get("kn") and sets[1].get(k, {}).get("kn")]
    assert got["located_both"] == len(both) > 0
    js = []  # plain loop
    for k in both:
        a, b = ({tuple(x) for x in s[k]["kn"]} for s in sets)
        js.append(len(a & b) / len(a | b))
    assert got["jaccard"]["value"] == pytest.approx(sum(js) / len(js))
    assert got["labels"] == ["m = 20 (riemann_right)", "converged (steps adaptive, gausslegendre)"]
    assert got["paired_suppress"]["n"] <= len(both)
    assert "| claim (held-out prompts) | m = 20 (riemann_right) |" in md.read_text()
    # runs of other facts are refused in one line
    other = tmp_path / "other"
    shutil.copytree(conv, other)
    res = _json(other / "results.json")
    res["relations"] = {k: v[:-1] for k, v in res["relations"].items()}
    (other / "results.json").write_text(json.dumps(res))
    capsys.readouterr()
    assert main(["bench", "convergence", str(tiny_run), str(other), "--report", str(md)]) == 2
    err = capsys.readouterr().err
    assert "different facts" in err and len(err.strip().splitlines()) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5))), st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5))))
def test_jaccard_counts_shared_neurons_over_all_neurons(a, b):
    from kn_plugin.bench.common import neuron_jaccard
    from kn_plugin.locating import Neuron

    grid = [(layer, index) for layer in range(4) for index in range(6)]  # brute force over every neuron
    shared = sum(1 for n in grid if n in a and n in b)
    either = sum(1 for n in grid if n in a or n in b)
    expected = shared / either if either else None
    assert jaccard(a, b, both_empty=None) == expected
    assert jaccard([list(n) for n in a], b) == (1.0 if expected is None else expected)  # records hold lists
    assert neuron_jaccard([Neuron(*n) for n in a], [Neuron(*n) for n in b]) == (1.0 if expected is None else expected)


def test_comparison_rows_of_runs_with_other_edit_counts_line_up(monkeypatch):
    """Counts that differ between runs (edits, erased neurons) go in the cells, so two models'
    rows of one claim share a line."""
    import kn_plugin.bench.compare as compare

    def rows(edits, neurons):
        monkeypatch.setattr(compare, "paper_rows", lambda s: [
            (f"update: change rate ({edits} edits, prompts answered right before)", "80.0% [70.0%, 90.0%]", "48.5%",
             "higher than the paper"),
            (f"erase P19 ({neurons} neurons): its perplexity rises", "46 -> 5.22e+03", "1450 -> 2996", "holds")])
        return compare._pararel_rows({"counted": 10, "located": 9})

    a, b = rows(92, 20), rows(52, 3)
    assert [r[0] for r in a] == [r[0] for r in b]
    assert a[1] == ("update: change rate (prompts answered right before) [paper: 48.5%]",
                    "80.0% [70.0%, 90.0%], 92 edits (higher than the paper)", False)
    assert b[1][1].endswith("52 edits (higher than the paper)")
    assert a[2][0] == "erase P19: its perplexity rises [paper: 1450 -> 2996]"
