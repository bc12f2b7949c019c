"""Attribution methods as plug-ins of the knowledge-neuron pipeline."""

import json

import pytest
import torch
from captum.attr import LayerConductance, LayerDeepLift, LayerGradientXActivation, NeuronConductance
from conftest import FACTS, TINY
from test_pararel import PARAREL, needs_pararel

from kn_plugin import KnowledgeAttribution, captum_target, encode_fact, locate
from kn_plugin.attribution.methods import gradient_scores, resolve_method
from kn_plugin.cli import main
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.locating import LocateResult
from kn_plugin.scoring import target_log_prob

PARAPHRASES = {
    "tiny-llama": (["The capital of France is", "The capital city of France is", "France's capital is"], " Paris"),
    "tiny-gpt2": (["The capital of France is", "The capital city of France is", "France's capital is"], " Paris"),
    "tiny-bert": (["The capital of France is [MASK] .", "France has [MASK] as capital .", "[MASK] is in France ."],
                  "paris"),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", TINY)
def test_grad_x_act_equals_captum(tiny_models, name):
    model = tiny_models[name]
    prompt, target = FACTS[name]
    fact = encode_fact(model, prompt, target)
    with model.frozen():
        ours, acts, prob = gradient_scores(model, fact, all_positions=False)
    for layer in range(model.n_layers):
        t = captum_target(model, prompt, target, layer)
        ref = LayerGradientXActivation(t.forward_func, t.layer).attribute(t.inputs)[0].detach()
        assert _rel(ours[layer], ref) < 1e-5, layer
    assert prob == pytest.approx(model_prob(model, fact), rel=1e-6)


def model_prob(model, fact) -> float:
    with torch.no_grad():
        return target_log_prob(model.hf_model(fact.input_ids).logits, fact).exp().item()


@pytest.mark.parametrize("name", TINY)
def test_atp_equals_its_definition_by_hand(tiny_models, name):
    """AtP towards zero: sum over positions of a * d log P / d a, one layer at a time by hand."""
    model = tiny_models[name]
    prompt, target = FACTS[name]
    fact = encode_fact(model, prompt, target)
    with model.frozen():
        ours, _, _ = gradient_scores(model, fact, all_positions=True)
        for layer in range(model.n_layers):
            leaf = {}

            def swap(act, leaf=leaf):
                leaf["a"] = act.detach().clone().requires_grad_(True)
                return leaf["a"]

            handle = model.adapter.patch_site(layer, swap)
            try:
                with torch.enable_grad():
                    logp = target_log_prob(model.hf_model(fact.input_ids).logits, fact)[0]
                    (grad,) = torch.autograd.grad(logp, leaf["a"])
            finally:
                handle.remove()
            by_hand = (leaf["a"].detach() * grad)[0].sum(0)
            assert _rel(ours[layer], by_hand) < 1e-5, layer


@pytest.mark.parametrize("name", TINY)
def test_methods_flow_through_locate_and_refinement(tiny_models, name):
    model = tiny_models[name]
    prompts, target = PARAPHRASES[name]
    gxa = locate(model, prompts, target, method="grad_x_act", progress=False)
    cls = locate(model, prompts, target, method=LayerGradientXActivation, progress=False)
    assert gxa.method == "grad_x_act" and cls.method == "captum:LayerGradientXActivation"
    assert [n.key for n in cls.neurons] == [n.key for n in gxa.neurons]
    for a, b in zip(cls.attributions, gxa.attributions):
        assert _rel(a.scores, b.scores) < 1e-5

    def doubled_activation(m, fact):  # a user's method: same ranking as the activation baseline
        return 2 * KnowledgeAttribution(m).attribute(fact.input_ids, fact.target, layers=[], progress=False).activations

    custom = locate(model, prompts, target, method=doubled_activation, progress=False)
    base = locate(model, prompts, target, method="activation", progress=False)
    assert custom.method == "callable:doubled_activation"
    assert [n.key for n in custom.neurons] == [n.key for n in base.neurons] and custom.share == base.share
    assert [[n.key for n in c] for c in custom.coarse] == [[n.key for n in c] for c in base.coarse]


@pytest.mark.parametrize("name", TINY)
def test_ig_is_unchanged(tiny_models, name):
    model = tiny_models[name]
    prompts, target = PARAPHRASES[name]
    res = locate(model, prompts, target, progress=False)
    assert res.method == "ig"
    ka = KnowledgeAttribution(model)
    for p, a in zip(prompts, res.attributions):
        assert torch.equal(a.scores, ka.attribute(p, target, progress=False).scores)


def test_cheap_methods_take_one_forward_and_one_backward_per_prompt(tiny_models, monkeypatch):
    model = tiny_models["tiny-llama"]
    prompts, target = PARAPHRASES["tiny-llama"]
    forwards, backwards = [], []
    handle = model.hf_model.register_forward_pre_hook(lambda *a: forwards.append(1))
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: backwards.append(1) or real_grad(*a, **k))
    try:
        for method in ("grad_x_act", "atp"):
            forwards.clear()
            backwards.clear()
            res = locate(model, prompts, target, method=method, progress=False)
            assert len(forwards) == len(prompts) and len(backwards) == len(prompts), method
            assert all(a.steps == 1 and a.engine == method for a in res.attributions)
    finally:
        handle.remove()


def test_conductance_runs_and_results_reload(tiny_models, tmp_path):
    model = tiny_models["tiny-gpt2"]
    prompts, target = PARAPHRASES["tiny-gpt2"]
    res = locate(model, prompts, target, method="conductance", steps=5, progress=False)
    assert res.method == "conductance" and res.attributions[0].steps == 5
    t = captum_target(model, prompts[0], target, 1)
    ref = LayerConductance(t.forward_func, t.layer).attribute(t.inputs, baselines=t.baselines, n_steps=5,
                                                              method="riemann_right")[0]
    assert _rel(res.attributions[0].scores[1], ref.detach()) < 1e-5
    back = LocateResult.load(res.save(tmp_path / "c.json"))
    assert back.method == "conductance" and back.neurons == res.neurons


def test_bad_methods_are_one_line_errors(tiny_models, capsys):
    model = tiny_models["tiny-llama"]
    with pytest.raises(KnowledgeNeuronError, match="unknown method 'magic'"):
        locate(model, "The capital of France is", " Paris", method="magic")
    with pytest.raises(KnowledgeNeuronError, match=r"returned shape \[3\], expected \[2, 64\]|returned shape"):
        locate(model, "The capital of France is", " Paris", method=lambda m, f: torch.zeros(3), progress=False)
    with pytest.raises(KnowledgeNeuronError, match="neuron_selector"):
        resolve_method(NeuronConductance)
    with pytest.raises(KnowledgeNeuronError, match="takes 'model', not a forward function"):
        resolve_method(LayerDeepLift)
    for method, match in (("magic", "unknown method"), ("captum:LayerDeepLift", "not a forward function"),
                          ("captum:Nope", "no class 'Nope'")):
        assert main(["locate", "--model", "tiny-llama", "--prompt", "a b", "--target", " c", "--method", method]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("kn: error:") and len(err.splitlines()) == 1 and match in err, err
    assert main(["bench", "methods", "--model", "tiny-llama", "--methods", "ig,magic", "--out", "x"]) == 2
    assert "unknown method 'magic'" in capsys.readouterr().err


@needs_pararel
def test_bench_methods_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "m"
    args = ["bench", "methods", "--model", "tiny-llama", "--pararel", str(PARAREL), "--relations", "P36,P19",
            "--facts-per-relation", "2", "--max-rank", "400", "--steps", "5", "--random-draws", "2",
            "--out", str(out), "--quiet"]
    assert main(args) == 0
    for name in ("results.json", "report.md", "effect_vs_cost.png"):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    rows = results["summary"]["methods"]
    assert list(rows) == ["ig", "grad_x_act", "atp", "activation", "conductance"]
    assert rows["ig"]["jaccard_with_ig"] in (1.0, None)
    counted = results["summary"]["counted"]
    assert counted >= 2 and all(r["facts"] == counted for r in rows.values())
    report = (out / "report.md").read_text()
    assert "kn bench methods" in report and "| grad_x_act |" in report
    # resumable: a rerun computes nothing and writes the same summary
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "methods").rglob("*.json")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "methods").rglob("*.json")} == mtimes
    again = json.loads((out / "results.json").read_text())["summary"]
    assert again == results["summary"]
