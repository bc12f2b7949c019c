"""No hook survives any call, including calls that raise (cf. Captum's hook-removal test)."""

import pytest
import torch
from captum.attr import LayerIntegratedGradients
from conftest import FACTS, all_hooks

from kn_plugin.attribution import KnowledgeAttribution
from kn_plugin.evaluation import intervened_probs
from kn_plugin.integrations.captum import captum_target
from kn_plugin.interventions import add_intervention, amplify, suppress
from kn_plugin.locating import locate
from kn_plugin.scoring import encode_fact


class Boom(RuntimeError):
    pass


def _explode_after(module, calls):
    """A forward hook that raises on the ``calls``-th forward of ``module``."""
    count = {"n": 0}

    def hook(*_):
        count["n"] += 1
        if count["n"] >= calls:
            raise Boom("injected failure")

    return module.register_forward_hook(hook)


@pytest.mark.parametrize("engine", ["fast", "batched", "captum"])
@pytest.mark.parametrize("calls", [1, 2, 3])
def test_attribution_leaves_no_hook_when_it_raises(tiny, engine, calls):
    prompt, target = FACTS[tiny.name]
    before = all_hooks(tiny.hf_model)
    # the last layer's neuron-site module runs in every engine's passes
    site = tiny.adapter.site_module(tiny.n_layers - 1)
    bomb = _explode_after(getattr(site, "original_component", None) or site, calls)
    try:
        with pytest.raises(Boom):
            KnowledgeAttribution(tiny, engine).attribute(prompt, target, progress=False)
    finally:
        bomb.remove()
    assert all_hooks(tiny.hf_model) == before


def test_successful_calls_leave_no_hook(tiny):
    prompt, target = FACTS[tiny.name]
    before = all_hooks(tiny.hf_model)
    for engine in ("fast", "batched", "captum"):
        locate(tiny, [prompt, prompt], target, engine=engine, progress=False)
    t = captum_target(tiny, prompt, target, 0)
    LayerIntegratedGradients(t.forward_func, t.layer).attribute(t.inputs, baselines=t.baselines)
    intervened_probs(tiny, [encode_fact(tiny, prompt, target)], [(0, 1)], factor=0.0)
    assert all_hooks(tiny.hf_model) == before


def test_interventions_restore_hooks_on_exception(tiny):
    before = all_hooks(tiny.hf_model)
    for ctx in (suppress(tiny, [(0, 1), (1, 2)], position=1), amplify(tiny, [(2, 3)], position=1)):
        with pytest.raises(Boom):
            with ctx:
                assert all_hooks(tiny.hf_model) > before
                raise Boom()
        assert all_hooks(tiny.hf_model) == before
    handle = add_intervention(tiny, [(0, 1)], factor=3.0, position=None)
    handle.remove()
    assert all_hooks(tiny.hf_model) == before


def test_bad_neuron_leaves_no_partial_intervention(tiny):
    before = all_hooks(tiny.hf_model)
    with pytest.raises(ValueError, match="out of range"):
        add_intervention(tiny, [(0, 1), (0, 10_000)], position=None)
    assert all_hooks(tiny.hf_model) == before


def test_tl_and_hf_suppression_agree(tiny):
    from kn_plugin.interventions import fwd_hooks

    prompt, target = FACTS[tiny.name]
    fact = encode_fact(tiny, prompt, target)
    neurons = [(0, 3), (1, 5), (2, 7), (2, 8)]
    with torch.no_grad():
        with suppress(tiny, neurons, position=fact.pred_pos):
            hf = tiny.hf_model(fact.input_ids).logits
        tl = tiny.bridge().run_with_hooks(fact.input_ids,
                                          fwd_hooks=fwd_hooks(neurons, 0.0, position=fact.pred_pos))
    torch.testing.assert_close(hf, tl)
    # an EncodedFact stands for its prediction position (the mask slot of BERT)
    with torch.no_grad():
        with suppress(tiny, neurons, position=fact):
            by_fact = tiny.hf_model(fact.input_ids).logits
        tl_fact = tiny.bridge().run_with_hooks(fact.input_ids, fwd_hooks=fwd_hooks(neurons, 0.0, position=fact))
    torch.testing.assert_close(by_fact, hf)
    torch.testing.assert_close(tl_fact, hf)
