"""Slow tests on the real default model, SmolLM2-135M-Instruct."""

import json

import pytest
import torch

from kn_plugin.adapters.transformer_lens import hook_name
from kn_plugin.assess import encode_fact, target_log_prob
from kn_plugin.attribution import KnowledgeAttribution
from kn_plugin.cli import main
from kn_plugin.interventions import fwd_hooks

pytestmark = pytest.mark.slow
PARIS = ["The capital of France is", "The capital city of France is", "The French capital is"]


def test_tl_and_hf_sites_identical(smollm2):
    bridge = smollm2.bridge()  # booting switches HF attention to eager: compare after it
    fact = encode_fact(smollm2, PARIS[0], " Paris")
    grabbed = {}
    handles = [smollm2.adapter.patch_site(layer, lambda a, layer=layer: grabbed.setdefault(layer, a))
               for layer in range(smollm2.n_layers)]
    try:
        with torch.no_grad():
            smollm2.hf_model(fact.input_ids)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        _, cache = bridge.run_with_cache(fact.input_ids)
    assert smollm2.n_layers == 30 and smollm2.d_mlp == 1536
    for layer in range(smollm2.n_layers):
        assert torch.equal(cache[hook_name(layer)], grabbed[layer])


def test_fast_engine_matches_batched_reference(smollm2):
    ka_fast = KnowledgeAttribution(smollm2, "fast")
    ka_ref = KnowledgeAttribution(smollm2, "batched")
    long = "After many long wars and treaties between the old kingdoms, the capital of France is"
    for prompt in (PARIS[0], long):
        fast = ka_fast.attribute(prompt, " Paris", progress=False)
        ref = ka_ref.attribute(prompt, " Paris", progress=False)
        assert (fast.scores - ref.scores).abs().max() <= 1e-4 * ref.scores.abs().max()


def test_locate_paris_and_suppress_with_tl_hook(smollm2, tmp_path):
    out = tmp_path / "paris.json"
    argv = ["locate", "--model", "smollm2", "--target", " Paris", "--json", str(out), "--quiet"]
    for p in PARIS:
        argv += ["--prompt", p]
    assert main(argv) == 0
    neurons = json.loads(out.read_text())["neurons"]
    assert 1 <= len(neurons) <= 30
    bridge = smollm2.bridge()
    for prompt in PARIS:
        fact = encode_fact(smollm2, prompt, " Paris")
        with torch.no_grad():
            before = target_log_prob(bridge(fact.input_ids), fact).exp().item()
            after = target_log_prob(bridge.run_with_hooks(
                fact.input_ids, fwd_hooks=fwd_hooks(neurons, 0.0, position=fact.pred_pos)), fact).exp().item()
        assert after <= 0.5 * before, (prompt, before, after)
