"""Slow tests on the second real model, Gemma-3-270M (Gemma Terms of Use)."""

import pytest
import torch

from kn_plugin import KnowledgeAttribution, assess, encode_fact, locate

pytestmark = pytest.mark.slow
JAPAN = ["The capital of Japan is", "The capital city of Japan is", "Japan's capital is"]


@pytest.fixture(scope="module")
def gemma():
    from kn_plugin.models import load_model

    return load_model("gemma3-270m")


def test_gemma3_loads_from_its_wheel(gemma):
    assert type(gemma.hf_model).__name__ == "Gemma3ForCausalLM"
    assert gemma.n_layers == 18 and gemma.d_mlp == 2048
    fact = encode_fact(gemma, JAPAN[0], " Tokyo")
    assert fact.input_ids[0, 0].item() == gemma.tokenizer.bos_token_id  # its tokenizer adds BOS
    a = assess(gemma, JAPAN[0], " Tokyo")
    assert a.rank == 0 and a.prob > 0.1


def test_gemma3_fast_engine_equals_the_batched_reference(gemma):
    layers = [0, 9, 17]
    fast = KnowledgeAttribution(gemma).attribute(JAPAN[0], " Tokyo", layers=layers, progress=False)
    ref = KnowledgeAttribution(gemma, "batched").attribute(JAPAN[0], " Tokyo", layers=layers, progress=False)
    assert fast.engine == "cached"
    top = ref.scores.abs().max()
    assert ((fast.scores - ref.scores).abs().max() / top).item() < 1e-4
    assert torch.allclose(fast.zeroed_prob, ref.zeroed_prob, rtol=1e-5, atol=1e-7)


def test_gemma3_locate_and_suppress(gemma):
    from kn_plugin.evaluation import intervention_effect

    res = locate(gemma, JAPAN, " Tokyo", progress=False)
    assert res.neurons
    facts = [encode_fact(gemma, p, " Tokyo") for p in JAPAN]
    eff = intervention_effect(gemma, facts, [n.key for n in res.neurons], 0.0, random_draws=2)
    assert eff.relative_change < 0 and abs(eff.random_relative_change) < abs(eff.relative_change)
