"""One forward of the model serves the clean activations, the reference's prefix cache and the
stepper's clean states; the self-check rides in the integration's first pass; passes are filled
to a row budget when the caller gives no batch size."""

import math

import pytest
import torch
from conftest import FACTS, MULTI
from hypothesis import given, settings
from hypothesis import strategies as st

from kn_plugin.attribution import DEFAULT_BATCH_SIZE, PASS_ROWS, KnowledgeAttribution
from kn_plugin.attribution.config import default_batch_size
from kn_plugin.attribution.engines import base, stepper, verified
from kn_plugin.families import steppers
from kn_plugin.models import load_model, wrap
from kn_plugin.scoring import cache_key_values, encode_fact, prefix_cache
from kn_plugin.tiny import tiny_family

CAUSAL = ("tiny-llama", "tiny-gpt2")


@pytest.fixture(scope="module")
def fresh():
    """Tiny models of their own: the shared ones may have been booted into a TransformerLens
    bridge by an earlier test, whose attention does not fill the Hugging Face cache."""
    return {name: load_model(name) for name in CAUSAL}


def _own_states(model, fact, plain):
    """The stepper's clean states from a forward of its own (what it runs when the clean pass
    captured nothing): the reference."""
    _, states = stepper.StepperEngine().prepare(model, fact, plain)
    return states.mids, states.acts, states.kvs


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("facts", [FACTS, MULTI])
def test_one_forward_gives_what_the_stepper_would_compute(fresh, name, facts):
    model = fresh[name]
    fact = encode_fact(model, *facts[name])
    engine = stepper.StepperEngine()
    with model.frozen():
        plain = base._clean(model, fact)
        clean = base._clean(model, fact, engine.capture(model))
        mids, acts, kvs = _own_states(model, fact, plain)
    assert plain.cache is None and plain.layer_acts is None and not plain.inputs
    torch.testing.assert_close(clean.acts, plain.acts, rtol=0, atol=1e-6)
    torch.testing.assert_close(clean.logp, plain.logp, rtol=0, atol=1e-6)
    (path,) = engine.capture(model)
    for layer in range(model.n_layers):
        torch.testing.assert_close(clean.layer_acts[layer][0, fact.pred_pos], clean.acts[layer])
        torch.testing.assert_close(clean.layer_acts[layer], acts[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(clean.inputs[path][layer], mids[layer], rtol=1e-5, atol=1e-5)
    got = cache_key_values(clean.cache, model.n_layers, fact.seq_len)
    assert got is not None
    for (k, v), (k_ref, v_ref) in zip(got, kvs):
        torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)
    assert cache_key_values(clean.cache, model.n_layers, fact.seq_len + 1) is None  # another prompt's length


@pytest.mark.parametrize("name", CAUSAL)
def test_prefix_cache_is_a_copy_equal_to_a_forward_of_the_prefix(fresh, name):
    model = fresh[name]
    fact = encode_fact(model, *FACTS[name])
    start = fact.pred_pos
    with model.frozen(), torch.no_grad():
        clean = base._clean(model, fact, ())
        past = prefix_cache(clean.cache, start)
        ref = model.hf_model(fact.input_ids[:, :start], use_cache=True).past_key_values
    assert past is not None and past.get_seq_length() == start
    assert clean.cache.get_seq_length() == fact.seq_len  # the clean pass's cache is left whole
    for mine, theirs in zip(cache_key_values(past, model.n_layers, start),
                            cache_key_values(ref, model.n_layers, start)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert prefix_cache(None, start) is None and prefix_cache(clean.cache, fact.seq_len + 1) is None


def test_prefix_cache_refuses_a_sliding_window_the_prompt_filled():
    km = wrap(*tiny_family("gemma3"))  # sliding window 4 on its local layers
    short = encode_fact(km, "The capital", " of")
    long = encode_fact(km, "The capital of France is Paris . The capital of Italy is", " Rome")
    with km.frozen():
        assert short.seq_len < 4 and long.seq_len > 4
        assert prefix_cache(base._clean(km, short, ()).cache, short.pred_pos) is not None
        assert prefix_cache(base._clean(km, long, ()).cache, long.pred_pos) is None
    # either way the cached engine equals the model's own modules, run in full
    for fact in (short, long):
        fast = KnowledgeAttribution(km, "cached").attribute(fact.input_ids, fact.target, progress=False)
        ref = KnowledgeAttribution(km, "batched").attribute(fact.input_ids, fact.target, progress=False)
        assert fast.engine == "cached"
        assert (fast.scores - ref.scores).abs().max() <= 1e-5 * ref.scores.abs().max()


@pytest.mark.parametrize("name", CAUSAL)
def test_the_stepper_runs_the_model_twice_and_itself_never_clean(fresh, name, monkeypatch):
    """The model's forward runs twice (the clean pass with its cache, then the reference's rows
    over the prefix cache); the stepper builds on the clean pass instead of a forward of its own."""
    model = fresh[name]
    prompt, target = FACTS[name]
    calls, embeds = [], []
    handle = model.hf_model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(1), with_kwargs=True)
    for cls in steppers.STEPPERS.values():  # a forward of the stepper's own starts at its embedding
        monkeypatch.setattr(cls, "embed", lambda self, ids, _f=cls.embed: (embeds.append(1), _f(self, ids))[1])
    try:
        res = KnowledgeAttribution(model, "stepper").attribute(prompt, target, progress=False)
    finally:
        handle.remove()
    assert res.engine == "stepper" and len(calls) == 2 and not embeds


def test_a_wrong_clean_state_is_caught_by_the_check_in_the_first_pass(tiny_models, monkeypatch):
    """Keys from the cache that are off make the folded self-check fail: the batched engine takes
    over, loudly, with the plain scores."""
    model = wrap(*tiny_family("llama"))
    prompt, target = FACTS["tiny-llama"]
    real = stepper.cache_key_values

    def off(*a):
        kvs = real(*a)
        return [(k + 0.5, v) for k, v in kvs] if kvs is not None else None

    monkeypatch.setattr(stepper, "cache_key_values", off)
    with pytest.warns(UserWarning, match="differs from the model's own forward") as record:
        res = KnowledgeAttribution(model, "stepper").attribute(prompt, target, progress=False)
    assert len([w for w in record if "batched" in str(w.message)]) == 1 and res.engine == "batched"
    ref = KnowledgeAttribution(model, "batched").attribute(prompt, target, progress=False)
    torch.testing.assert_close(res.scores, ref.scores)


@pytest.mark.parametrize("layers_per_pass", [None, 1, 2])
def test_the_check_rows_leave_the_scores_as_a_separate_check_would(tiny_models, monkeypatch, layers_per_pass):
    """The check's rows ride in the first pass of each group of layers and are compared there;
    the scores are those of the integration alone (the check's gradients are not summed)."""
    model = tiny_models["tiny-llama"]
    prompt, target = FACTS["tiny-llama"]
    compared = []
    real = verified._SelfCheck.compare
    monkeypatch.setattr(verified._SelfCheck, "compare", lambda self, got: (compared.append(sorted(got)),
                                                                           real(self, got))[1])
    res = KnowledgeAttribution(model, "stepper").attribute(prompt, target, progress=False,
                                                           layers_per_pass=layers_per_pass, batch_size=7)
    n = model.n_layers
    groups = [list(range(i, min(n, i + (layers_per_pass or n)))) for i in range(0, n, layers_per_pass or n)]
    assert compared == groups  # once per group, each of its layers
    ref = KnowledgeAttribution(model, "batched").attribute(prompt, target, progress=False, batch_size=7)
    assert (res.scores - ref.scores).abs().max() <= 1e-5 * ref.scores.abs().max()


def _brute_batch(pass_rows, steps, layers):
    per_pass = max(1, pass_rows // layers)
    passes = next(p for p in range(1, steps + 1) if math.ceil(steps / p) <= per_pass)
    return next(b for b in range(1, steps + 1) if math.ceil(steps / b) == passes)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 400), st.integers(1, 64))
def test_default_batch_size_fills_the_fewest_passes_evenly(pass_rows, steps, layers):
    got = default_batch_size(pass_rows, steps, layers)
    assert got == _brute_batch(pass_rows, steps, layers)
    assert got * layers <= max(pass_rows, layers)  # within the budget (one step a pass at least)
    assert default_batch_size(None, steps, layers) == DEFAULT_BATCH_SIZE
    assert default_batch_size(pass_rows, "adaptive", layers) == max(1, pass_rows // layers)


def test_no_batch_size_means_one_pass_of_the_paper_steps_on_the_fast_engines(tiny_models, monkeypatch):
    model = tiny_models["tiny-llama"]
    prompt, target = FACTS["tiny-llama"]
    assert 20 * model.n_layers <= PASS_ROWS
    passes = []
    real = verified.VerifiedEngine._point_grads
    monkeypatch.setattr(verified.VerifiedEngine, "_point_grads",
                        lambda self, *a: (passes.append(sum(len(x) for x in a[5]) if isinstance(a[5], list)
                                                        else len(a[5]) * len(a[3])), real(self, *a))[1])
    res = KnowledgeAttribution(model, "stepper").attribute(prompt, target, progress=False)
    assert len(passes) == 1 and passes[0] == 20 * model.n_layers + model.n_layers + 1  # with the check's rows
    ten = KnowledgeAttribution(model, "stepper").attribute(prompt, target, progress=False, batch_size=10)
    assert (res.scores - ten.scores).abs().max() <= 1e-6 * ten.scores.abs().max()


def test_a_forward_that_takes_no_cache_argument_still_runs_the_stepper(tiny_models, monkeypatch):
    """The clean pass asks for the model's cache; a forward that refuses ``use_cache`` gets the
    plain pass (whatever cache it returns by default), with the same scores."""
    model = tiny_models["tiny-llama"]
    prompt, target = FACTS["tiny-llama"]
    expected = KnowledgeAttribution(model, "stepper").attribute(prompt, target, progress=False)
    real, asked = model.hf_model.forward, []

    def no_cache(input_ids=None, logits_to_keep=0, **kwargs):
        asked.append("use_cache" in kwargs)
        if "use_cache" in kwargs:
            raise TypeError("forward() got an unexpected keyword argument 'use_cache'")
        return real(input_ids, logits_to_keep=logits_to_keep, **kwargs)

    monkeypatch.setattr(model.hf_model, "forward", no_cache)
    with model.frozen():
        clean = base._clean(model, encode_fact(model, prompt, target), ("post_attention_layernorm",))
    assert asked == [True, False] and clean.layer_acts is not None
    torch.testing.assert_close(clean.logp.exp(), torch.tensor([expected.target_prob]), rtol=1e-5, atol=0)
    res = KnowledgeAttribution(model, "stepper").attribute(prompt, target, progress=False)
    assert res.engine == "stepper"
    assert (res.scores - expected.scores).abs().max() <= 1e-5 * expected.scores.abs().max()


def test_prompts_together_take_no_batch_size_as_ten_steps_a_pass(tiny_models):
    model = tiny_models["tiny-llama"]
    prompts, target = ["The capital of France is", "France's capital is"], " Paris"
    ka = KnowledgeAttribution(model, "batched")
    default = ka.attribute_prompts(prompts, target, progress=False)
    ten = ka.attribute_prompts(prompts, target, batch_size=DEFAULT_BATCH_SIZE, progress=False)
    for a, b in zip(default, ten):
        assert torch.equal(a.scores, b.scores)
