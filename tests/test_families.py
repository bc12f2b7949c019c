"""Every supported family, as a user holds it: a tiny random model built from its config.

Each family is checked against independent references: a plain IG loop (one alpha per
forward, a plain forward pre-hook on the module named below, not the adapter's), the
TransformerLens ``hook_post`` activation, suppression through TL hooks, bit-exact undo of an
update edit, and the user's module left as it was found.
"""

import re
from pathlib import Path

import pytest
import torch
from conftest import all_hooks

from kn_plugin import KnowledgeAttribution, encode_fact, fwd_hooks, locate, suppress, wrap
from kn_plugin.editing import unchanged_since, update_fact, weight_snapshot
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.family_support import FACTS, family_table, probe_family, readme_table
from kn_plugin.tiny import TINY_FAMILIES, TINY_MOE, tiny_family

STEPS = 20
#: the FFN output projection of layer {} in each family, written out here independently of
#: the adapters' detection
SITE_PATHS = {
    **{f: "model.layers.{}.mlp.down_proj" for f in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo", "olmo2", "granite",
        "smollm3", "stablelm", "cohere")},
    "phi": "model.layers.{}.mlp.fc2", "starcoder2": "model.layers.{}.mlp.c_proj",
    "gpt2": "transformer.h.{}.mlp.c_proj", "gpt_neo": "transformer.h.{}.mlp.c_proj",
    "gpt_bigcode": "transformer.h.{}.mlp.c_proj", "gptj": "transformer.h.{}.mlp.fc_out",
    "gpt_neox": "gpt_neox.layers.{}.mlp.dense_4h_to_h", "opt": "model.decoder.layers.{}.fc2",
    "falcon": "transformer.h.{}.mlp.dense_4h_to_h", "bloom": "transformer.h.{}.mlp.dense_4h_to_h",
    "bert": "bert.encoder.layer.{}.output.dense", "roberta": "roberta.encoder.layer.{}.output.dense",
    "xlm-roberta": "roberta.encoder.layer.{}.output.dense", "electra": "electra.encoder.layer.{}.output.dense",
    "distilbert": "distilbert.transformer.layer.{}.ffn.lin2",
}
ROWS = {}


def _module(model, path):
    for name in path.split("."):
        model = getattr(model, name)
        model = getattr(model, "original_component", None) or model
    return model


def _pick(act, pos):
    """The activation row at ``pos`` of a batch-1 site input ([1, seq, d] or flattened [seq, d])."""
    return (0, pos) if act.dim() == 3 else (pos,)


def plain_ig(hf, family, layer, fact, steps):
    """IG by a plain loop: one alpha per forward, a plain forward pre-hook on the site."""
    module = _module(hf, SITE_PATHS[family].format(layer))
    grabbed = {}
    h = module.register_forward_pre_hook(lambda m, a: grabbed.setdefault("a", a[0].detach().clone()))
    try:
        with torch.no_grad():
            hf(fact.input_ids)
    finally:
        h.remove()
    a = grabbed["a"][_pick(grabbed["a"], fact.pred_pos)]
    total = torch.zeros_like(a)
    tgt = torch.tensor(fact.target_ids)
    for k in range(1, steps + 1):
        x = (k / steps * a).clone().requires_grad_(True)

        def patch(m, args, x=x):
            act = args[0].clone()
            act[_pick(act, fact.pred_pos)] = x
            return (act, *args[1:])

        h = module.register_forward_pre_hook(patch)
        try:
            with torch.enable_grad():
                logits = hf(fact.input_ids).logits[0, list(fact.score_positions)]
                logp = torch.log_softmax(logits.float(), -1)[torch.arange(len(tgt)), tgt].sum()
                logp.exp().backward()
        finally:
            h.remove()
        total += x.grad
    return a * total / steps


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_family(family):
    row, _ = probe_family(family)
    ROWS[family] = row
    hf, tok = tiny_family(family)
    hf.train()  # the user's model is in training mode, with weight gradients on
    hooks = all_hooks(hf)
    km = wrap(hf, tokenizer=tok)
    assert wrap(hf, tokenizer=tok) is km and wrap(km) is km and wrap(hf) is km
    assert km.n_layers == 2 and km.d_mlp == _module(hf, SITE_PATHS[family].format(0)).weight.numel() // 32
    prompt, target = FACTS[km.is_masked]
    assert km.is_masked == (row.scoring == "masked")

    res = KnowledgeAttribution(km).attribute(prompt, target, steps=STEPS, progress=False)
    assert res.engine == row.engine
    assert all(m.training for m in hf.modules()) and all(p.requires_grad for p in hf.parameters())
    assert all_hooks(hf) == hooks

    hf.eval()
    fact = encode_fact(km, prompt, target)
    ref = torch.stack([plain_ig(hf, family, layer, fact, STEPS) for layer in range(km.n_layers)])
    assert ref.abs().max() > 0
    assert (res.scores - ref).abs().max() <= 1e-5 * ref.abs().max()

    # suppress through HF hooks; the edit and its exact undo
    neurons = [(0, 1), (1, 3), (1, 5)]
    with torch.no_grad(), suppress(km, neurons, position=fact):
        hf_logits = hf(fact.input_ids).logits
    snapshot = weight_snapshot(km)
    edit = update_fact(km, neurons, target, " Rome" if not km.is_masked else "rome", prompts=[prompt])
    with edit.applied(hf, tokenizer=tok):
        assert not unchanged_since(snapshot)
    assert unchanged_since(snapshot)

    if not row.bridge:
        assert family in ("xlm-roberta", "distilbert", "electra")  # TransformerLens 4.3 refuses these
        return
    bridge = km.bridge()
    assert wrap(bridge) is km
    grabbed = {}
    handles = [km.adapter.patch_site(layer, lambda a, layer=layer: grabbed.setdefault(layer, a.clone()))
               for layer in range(km.n_layers)]
    try:
        with torch.no_grad():
            hf(fact.input_ids)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        _, cache = bridge.run_with_cache(fact.input_ids)
        tl_logits = bridge.run_with_hooks(fact.input_ids, fwd_hooks=fwd_hooks(neurons, 0.0, position=fact))
    for layer in range(km.n_layers):
        torch.testing.assert_close(cache[f"blocks.{layer}.mlp.hook_post"], grabbed[layer], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tl_logits, hf_logits, atol=1e-5, rtol=1e-4)
    # the bridge itself is accepted wherever a model is
    hooks = all_hooks(hf)  # the bridge registers TransformerLens' own hooks; none of ours may stay
    by_bridge = locate(bridge, [prompt, prompt], target, steps=4, progress=False)
    by_hf = locate(hf, [prompt, prompt], target, steps=4, progress=False, tokenizer=tok)
    assert [n.key for n in by_bridge.neurons] == [n.key for n in by_hf.neurons]
    assert all_hooks(hf) == hooks


def test_readme_family_table_is_what_the_tests_measure():
    rows = [ROWS.get(f) or probe_family(f)[0] for f in TINY_FAMILIES]
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert readme_table(readme) == family_table(rows), "run `kn families --write README.md`"


@pytest.mark.parametrize("family", list(TINY_MOE))
def test_mixture_of_experts_is_refused(family):
    hf, tok = tiny_family(family)
    with pytest.raises(KnowledgeNeuronError, match="mixture-of-experts"):
        wrap(hf, tokenizer=tok)


def test_unsupported_module_is_refused_with_the_family_list():
    with pytest.raises(KnowledgeNeuronError, match="supported are Llama"):
        wrap(torch.nn.Sequential(torch.nn.Linear(3, 3)), tokenizer=tiny_family("llama")[1])


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_model_agnostic_fast_path_runs_without_fallback(family, recwarn):
    hf, tok = tiny_family(family)
    km = wrap(hf, tokenizer=tok)
    res = KnowledgeAttribution(km).attribute("The capital of France is", " Paris", progress=False)
    assert res.engine == "cached" and "engine_notes" not in res.extras
    assert not [w for w in recwarn if "engine" in str(w.message)]
    long_prompt = "The capital of France is Paris . The capital of Germany is Berlin . The capital of Italy is"
    assert len(encode_fact(km, long_prompt, " Rome").input_ids[0]) > 2 * TINY_FAMILIES[family][1].get(
        "sliding_window", 4)  # longer than the sliding window
    fast = KnowledgeAttribution(km, "cached").attribute(long_prompt, " Rome", progress=False)
    ref = KnowledgeAttribution(km, "batched").attribute(long_prompt, " Rome", progress=False)
    assert fast.engine == "cached"
    assert (fast.scores - ref.scores).abs().max() <= 1e-5 * ref.scores.abs().max()


def test_granite_stepper_mismatch_falls_back_with_one_warning(monkeypatch):
    hf, tok = tiny_family("granite")
    km = wrap(hf, tokenizer=tok)
    from kn_plugin.families import steppers

    # force the hand-written Llama stepper onto Granite (it ignores logits_scaling and the multipliers)
    monkeypatch.setattr(steppers, "stepper_for", lambda adapter: steppers.GatedStepper(adapter))
    with pytest.warns(UserWarning, match="differs from the model's own forward") as record:
        res = KnowledgeAttribution(km, "stepper").attribute("The capital of France is", " Paris", progress=False)
    assert len([w for w in record if "batched" in str(w.message)]) == 1
    assert res.engine == "batched"
    ref = KnowledgeAttribution(km, "batched").attribute("The capital of France is", " Paris", progress=False)
    torch.testing.assert_close(res.scores, ref.scores)
    # the default engine skips the stepper that failed and uses the model's own modules
    assert KnowledgeAttribution(km).attribute("The capital of France is", " Paris", progress=False).engine == "cached"


@pytest.mark.parametrize("engine", ["stepper", "cached", "fast"])
def test_exception_inside_a_shortcut_falls_back(engine, monkeypatch):
    from kn_plugin import attribution

    km = wrap(*tiny_family("llama"))

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(attribution.StepperEngine, "log_probs", boom)
    monkeypatch.setattr(attribution.CachedEngine, "log_probs", boom)
    with pytest.warns(UserWarning, match="injected failure") as record:
        res = KnowledgeAttribution(km, engine).attribute("The capital of France is", " Paris", progress=False)
    assert len([w for w in record if "batched" in str(w.message)]) == 1
    assert res.engine == "batched"
    assert "failed_paths" not in vars(km) or not km.failed_paths  # exceptions are not remembered as mismatches


@pytest.mark.parametrize("family,dtype", [("llama", torch.bfloat16), ("gemma3", torch.bfloat16),
                                          ("llama", torch.float16)])
def test_half_precision_uses_the_fast_path(family, dtype):
    hf, tok = tiny_family(family)
    ref = KnowledgeAttribution(wrap(hf, tokenizer=tok), "batched").attribute(
        "The capital of France is", " Paris", progress=False)
    half, _ = tiny_family(family, dtype=dtype)
    res = KnowledgeAttribution(wrap(half, tokenizer=tok)).attribute("The capital of France is", " Paris",
                                                                    progress=False)
    assert res.engine in ("stepper", "cached")
    # documented tolerance against fp32: 5% of the largest score
    assert (res.scores - ref.scores).abs().max() <= 0.05 * ref.scores.abs().max()


def test_wrap_errors():
    hf, tok = tiny_family("llama")
    with pytest.raises(KnowledgeNeuronError, match="without a tokenizer"):
        wrap(hf)
    with pytest.raises(KnowledgeNeuronError, match="Hugging Face tokenizer"):
        wrap(hf, tokenizer="not a tokenizer")
    with pytest.raises(KnowledgeNeuronError, match="cannot use a int"):
        wrap(3)


def test_bridge_without_reloadable_tokenizer_is_refused():
    class FakeBridge:  # what wrap sees of a bridge: its HF model and tokenizer
        __module__ = "transformer_lens.fake"

        def __init__(self, model, tokenizer):
            self.original_model, self.tokenizer = model, tokenizer

    hf, _ = tiny_family("llama")
    with pytest.raises(KnowledgeNeuronError, match="no tokenizer"):
        wrap(FakeBridge(hf, None))
    with pytest.raises(KnowledgeNeuronError, match="pass tokenizer"):
        wrap(FakeBridge(hf, tiny_family("llama")[1]))  # built in memory: nothing to reload


def test_mode_and_flags_restored_when_a_call_raises():
    hf, tok = tiny_family("gpt2")
    hf.train()
    hf.transformer.h[0].requires_grad_(False)  # a user's mix of frozen and trainable weights
    flags = [p.requires_grad for p in hf.parameters()]
    with pytest.raises(KnowledgeNeuronError):
        locate(hf, ["The capital of France is"], "", tokenizer=tok)
    km = wrap(hf, tokenizer=tok)
    with pytest.raises(RuntimeError, match="boom"):
        with km.frozen():
            assert not hf.training and not any(p.requires_grad for p in hf.parameters())
            raise RuntimeError("boom")
    assert all(m.training for m in hf.modules())
    assert [p.requires_grad for p in hf.parameters()] == flags and any(flags) and not all(flags)


def test_token_id_prompts(tiny_models):
    km = tiny_models["tiny-llama"]
    text = KnowledgeAttribution(km).attribute("The capital of France is", " Paris", progress=False)
    ids = km.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    by_ids = KnowledgeAttribution(km).attribute(ids, " Paris", progress=False)
    torch.testing.assert_close(by_ids.scores, text.scores)
    with pytest.warns(UserWarning, match="BOS"):
        shifted = encode_fact(km, [km.tokenizer.bos_token_id, *ids[0].tolist()], " Paris")
    assert shifted.input_ids[0, 0].item() == km.tokenizer.bos_token_id  # kept as given, never shifted
    with pytest.raises(KnowledgeNeuronError, match="integer ids"):
        encode_fact(km, torch.ones(2, 3, 4), " Paris")
    with pytest.raises(KnowledgeNeuronError, match=r"0\.\."):
        encode_fact(km, [10 ** 6], " Paris")


def test_readme_lists_every_family():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for family in TINY_FAMILIES:
        assert re.search(rf"\| {re.escape(family)} \|", readme)


def test_kn_plugin_keeps_no_model_alive(tiny_models):
    import gc
    import weakref

    from kn_plugin import load_model
    from kn_plugin.editing import update_fact

    model = load_model(tiny_models["tiny-llama"].path)
    ref = weakref.ref(model.hf_model)
    locate(model, "The capital of France is", " Paris", steps=2, progress=False)
    update_fact(model, [(0, 1)], " Paris", " Rome").apply(model).revert()
    model.bridge()
    del model
    gc.collect()
    assert ref() is None


def test_bridge_booted_model_without_stepper_says_why_it_is_slow():
    hf, tok = tiny_family("gemma3")
    km = wrap(hf, tokenizer=tok)
    km.bridge()  # TransformerLens' attention components do not fill the Hugging Face cache
    with pytest.warns(UserWarning, match="TransformerLens") as record:
        res = KnowledgeAttribution(km).attribute("The capital of France is", " Paris", progress=False)
    assert res.engine == "batched" and len(record) == 1
    again = KnowledgeAttribution(km).attribute("The capital of France is", " Paris", progress=False)
    assert again.engine == "batched" and "did not verify" in again.extras["engine_notes"][0]


@pytest.mark.parametrize("n_heads,n_kv,seq,before", [(4, 2, 1, 5), (6, 3, 3, 4), (2, 2, 2, 0), (4, 1, 1, 7)])
def test_attention_over_a_shared_past_equals_attention_over_every_key(n_heads, n_kv, seq, before):
    """The stepper's attention reads the clean past once for all rows; it must give what plain
    causal attention gives over each row's full key list (an explicit softmax per row and head),
    and the same gradients to the new queries, keys and values."""
    from kn_plugin.families.steppers import attention

    g = torch.Generator().manual_seed(n_heads * 100 + seq * 10 + before)
    b, hd, scale = 5, 8, 0.3
    q, k, v = (torch.randn(b, h, seq, hd, generator=g, dtype=torch.float64).requires_grad_()
               for h in (n_heads, n_kv, n_kv))
    pk, pv = (torch.randn(1, n_kv, before, hd, generator=g, dtype=torch.float64) for _ in range(2))
    got = attention(q, k, v, (pk, pv), before, scale)
    want = torch.zeros(b, seq, n_heads * hd, dtype=torch.float64)
    for r in range(b):
        for h in range(n_heads):
            kv = h // (n_heads // n_kv)
            keys = torch.cat([pk[0, kv], k[r, kv]])
            vals = torch.cat([pv[0, kv], v[r, kv]])
            for i in range(seq):
                w = torch.softmax(keys[:before + i + 1] @ q[r, h, i] * scale, 0)
                want[r, i, h * hd:(h + 1) * hd] = w @ vals[:before + i + 1]
    torch.testing.assert_close(got, want)
    weights = torch.randn(want.shape, generator=g, dtype=torch.float64)
    grads = [torch.autograd.grad((x * weights).sum(), (q, k, v)) for x in (got, want)]
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c)
