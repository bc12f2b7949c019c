"""steps="adaptive": composite rules bisected where a layer's path needs it, checked against fixed
fine grids and against a plain loop over the model's own forward."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kn_plugin import KnowledgeAttribution, load_model
from kn_plugin.attribution import CONVERGED, KnowledgeNeuronWarning, integration_grid, worst_relative_gap
from kn_plugin.attribution.adaptive import ADAPTIVE_NEURON_TOLERANCE, ADAPTIVE_POINTS, rule_on
from kn_plugin.attribution.engines.stepper import StepperEngine
from kn_plugin.attribution.engines.verified import _row_chunks
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.scoring import encode_fact, target_log_prob

PROMPT, TARGET = "The capital of France is", " Paris"


def _sharp(name="tiny-llama", factor=4.0):
    """A tiny model whose layer 0 has a sharp path (its FFN scaled up): Gauss-Legendre at 5
    points misses that layer's completeness by far more than 1%."""
    model = load_model(name)
    mlp = model.adapter.layers()[0].mlp
    with torch.no_grad():
        for lin in ((mlp.up_proj, mlp.down_proj) if hasattr(mlp, "up_proj") else (mlp.c_fc, mlp.c_proj)):
            lin.weight.mul_(factor)
    return model


def _plain_ig(model, layer, intervals, grid="gausslegendre"):
    """The composite rule over ``intervals`` by a plain loop: one forward of the model per point
    with the layer's activation at the prediction position set to alpha * a."""
    fact = encode_fact(model, PROMPT, TARGET)
    acts = {}

    def grab(act):
        acts["a"] = act[0, fact.pred_pos].detach().clone()
        return act

    with model.adapter.patched({layer: grab}), torch.no_grad():
        model.hf_model(fact.input_ids)
    a = acts["a"].double()
    total = torch.zeros_like(a)
    for lo, hi in intervals:
        alphas, weights = rule_on(grid, lo, hi)
        for alpha, w in zip(alphas.tolist(), weights.tolist()):
            x = (alpha * acts["a"]).requires_grad_(True)

            def patch(act, x=x):
                act = act.clone()
                act[0, fact.pred_pos] = x
                return act

            with model.adapter.patched({layer: patch}), torch.enable_grad():
                prob = target_log_prob(model.hf_model(fact.input_ids).logits, fact).exp().sum()
                (g,) = torch.autograd.grad(prob, x)
            total += w * a * g.double()
    return total


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_adaptive_equals_a_fine_fixed_grid_within_its_tolerance(name):
    model = _sharp(name)
    ka = KnowledgeAttribution(model)
    five = ka.attribute(PROMPT, TARGET, steps=ADAPTIVE_POINTS, grid="gausslegendre", progress=False)
    fine = ka.attribute(PROMPT, TARGET, steps=1000, grid="gausslegendre", progress=False)
    res = ka.attribute(PROMPT, TARGET, progress=False, **CONVERGED)
    scale = fine.scores.abs().max()
    assert (five.scores - fine.scores).abs().max() > 10 * ADAPTIVE_NEURON_TOLERANCE * scale  # 5 points are far off
    assert (res.scores - fine.scores).abs().max() <= ADAPTIVE_NEURON_TOLERANCE * scale
    assert worst_relative_gap(res) <= 0.01
    per, spent = res.extras["steps_per_layer"], res.extras["evaluations_per_layer"]
    assert per[0] > ADAPTIVE_POINTS and list(res.extras["intervals"]) == ["0"] and res.steps == max(per)
    assert per[1:] == [ADAPTIVE_POINTS] * (model.n_layers - 1) and spent[1:] == per[1:]
    assert spent[0] > per[0]  # the coarser rules it compared with were paid for too
    assert torch.equal(res.scores[1:], five.scores[1:])  # the layers that met the gap keep the first rung
    assert (res.extras["rule"], res.extras["grid"], res.extras["dtype"], res.extras["matmul_dtype"]) == (
        "adaptive", "gausslegendre", "float32", "float32")


def test_adaptive_intervals_partition_the_path_and_equal_a_plain_loop():
    model = _sharp()
    res = KnowledgeAttribution(model).attribute(PROMPT, TARGET, progress=False, **CONVERGED)
    intervals = res.extras["intervals"]["0"]
    assert intervals[0][0] == 0.0 and intervals[-1][1] == 1.0
    assert all(a[1] == b[0] for a, b in zip(intervals, intervals[1:]))
    assert res.extras["steps_per_layer"][0] == ADAPTIVE_POINTS * len(intervals)
    want = _plain_ig(model, 0, intervals)
    assert torch.allclose(res.scores[0].double(), want, atol=1e-6 * want.abs().max().item(), rtol=0)


def test_rule_on_maps_the_rule_to_an_interval():
    alphas, weights = integration_grid("gausslegendre", ADAPTIVE_POINTS)
    a, w = rule_on("gausslegendre", 0.25, 0.75)
    assert torch.allclose(a, 0.25 + 0.5 * alphas) and torch.allclose(w, 0.5 * weights)
    for k in range(2 * ADAPTIVE_POINTS):  # exact for polynomials of degree < 2n on any interval
        assert (w * a ** k).sum().item() == pytest.approx((0.75 ** (k + 1) - 0.25 ** (k + 1)) / (k + 1), rel=1e-12)
    a, w = rule_on("riemann_right", 0.5, 1.0)  # uniform rules get their 1/m weights
    assert torch.allclose(w, torch.full((ADAPTIVE_POINTS,), 0.5 / ADAPTIVE_POINTS, dtype=torch.float64))


@pytest.mark.parametrize("engine", ["stepper", "cached", "batched"])
def test_adaptive_agrees_across_engines(engine):
    model = _sharp()
    ref = KnowledgeAttribution(model, engine="batched").attribute(PROMPT, TARGET, progress=False, **CONVERGED)
    res = KnowledgeAttribution(model, engine=engine).attribute(PROMPT, TARGET, progress=False, **CONVERGED)
    assert res.engine == engine and res.extras["intervals"] == ref.extras["intervals"]
    assert torch.allclose(res.scores, ref.scores, atol=1e-5 * ref.scores.abs().max().item(), rtol=0)


def test_adaptive_falls_back_loudly_when_the_shortcut_raises(monkeypatch):
    model = _sharp()
    want = KnowledgeAttribution(model, engine="batched").attribute(PROMPT, TARGET, progress=False, **CONVERGED)
    real = StepperEngine.log_probs

    def broken(self, model, state, fact, layers, activations, alphas):
        if isinstance(alphas, list):  # only the adaptive rounds' per-layer points
            raise RuntimeError("boom")
        return real(self, model, state, fact, layers, activations, alphas)

    monkeypatch.setattr(StepperEngine, "log_probs", broken)
    with pytest.warns(KnowledgeNeuronWarning, match="boom; using the batched engine"):
        res = KnowledgeAttribution(model, engine="stepper").attribute(PROMPT, TARGET, progress=False, **CONVERGED)
    assert torch.allclose(res.scores, want.scores, atol=1e-5 * want.scores.abs().max().item(), rtol=0)


def test_adaptive_says_when_it_stops_at_the_cap():
    model = _sharp()
    with pytest.warns(KnowledgeNeuronWarning, match="stopped at max_steps=45 points for layer"):
        res = KnowledgeAttribution(model).attribute(PROMPT, TARGET, progress=False, max_steps=45, **CONVERGED)
    assert res.extras["evaluations_per_layer"][0] <= 45


def test_adaptive_input_errors(tiny_models):
    ka = KnowledgeAttribution(tiny_models["tiny-llama"])
    for kwargs, match in (({"neuron_tolerance": 0}, "neuron_tolerance must be > 0"),
                          ({"max_steps": 4}, "needs max_steps >= 5"),
                          ({"tolerance": -1}, "tolerance must be > 0"),
                          ({"grid": "simpson"}, "unknown grid")):
        with pytest.raises(KnowledgeNeuronError, match=match):
            ka.attribute(PROMPT, TARGET, steps="adaptive", progress=False, **{"grid": "gausslegendre", **kwargs})
    with pytest.raises(KnowledgeNeuronError, match="positive integer, 'auto' or 'adaptive', got 'Adaptive'"):
        ka.attribute(PROMPT, TARGET, steps="Adaptive", progress=False)
    with pytest.raises(KnowledgeNeuronError, match="captum engine does not give"):
        KnowledgeAttribution(tiny_models["tiny-llama"], engine="captum").attribute(PROMPT, TARGET, progress=False,
                                                                                  **CONVERGED)


def test_adaptive_on_smooth_layers_is_the_first_rung(tiny_models):
    ka = KnowledgeAttribution(tiny_models["tiny-llama"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = ka.attribute(PROMPT, TARGET, progress=False, **CONVERGED)
    five = ka.attribute(PROMPT, TARGET, steps=ADAPTIVE_POINTS, grid="gausslegendre", progress=False)
    assert torch.equal(res.scores, five.scores) and res.extras["intervals"] == {}
    assert res.extras["steps_per_layer"] == [ADAPTIVE_POINTS] * ka.model.n_layers


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.integers(0, 5), st.integers(0, 40), max_size=6), st.integers(1, 25))
def test_row_chunks_keep_every_point_once_within_the_budget(sizes, budget):
    points = {layer: torch.arange(n, dtype=torch.float64) + 100 * layer for layer, n in sizes.items()}
    passes = _row_chunks(points, budget)
    assert all(0 < sum(len(a) for a in p.values()) <= budget for p in passes)
    for layer, want in points.items():
        got = [p[layer] for p in passes if layer in p]
        assert torch.equal(torch.cat(got) if got else want[:0], want)


def test_adaptive_on_a_masked_lm_equals_a_fine_fixed_grid():
    model = load_model("tiny-bert")
    layer = model.adapter.layers()[0]
    with torch.no_grad():  # a sharp path in layer 0, as _sharp does for the causal models
        layer.intermediate.dense.weight.mul_(6)
        layer.output.dense.weight.mul_(6)
    args = ("The capital of France is [MASK].", "Paris")
    fine = KnowledgeAttribution(model).attribute(*args, steps=1000, grid="gausslegendre", progress=False)
    scale = fine.scores.abs().max()
    for engine in ("fast", "batched"):
        res = KnowledgeAttribution(model, engine=engine).attribute(*args, progress=False, **CONVERGED)
        assert res.extras["steps_per_layer"][0] > ADAPTIVE_POINTS  # layer 0 was refined
        assert (res.scores - fine.scores).abs().max() <= ADAPTIVE_NEURON_TOLERANCE * scale
