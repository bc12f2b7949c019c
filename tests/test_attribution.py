import pytest
import torch
from captum.attr import LayerActivation, LayerConductance, LayerGradientXActivation, LayerIntegratedGradients
from conftest import FACTS, MULTI
from reference import reference_ig

from kn_plugin import wrap
from kn_plugin.attribution import KnowledgeAttribution, KnowledgeNeuronWarning, riemann_alphas
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.integrations.captum import captum_target

STEPS = 20


@pytest.mark.parametrize("engine", ["fast", "batched", "captum"])
def test_ig_matches_plain_loop_reference(tiny, engine):
    prompt, target = FACTS[tiny.name]
    res = KnowledgeAttribution(tiny, engine).attribute(prompt, target, steps=STEPS, progress=False,
                                                      batch_size=7)
    ref = torch.stack([reference_ig(tiny, prompt, target, layer, STEPS) for layer in range(tiny.n_layers)])
    assert res.scores.shape == (tiny.n_layers, tiny.d_mlp)
    assert ref.abs().max() > 0
    assert (res.scores - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_layer_integrated_gradients_through_adapter(tiny):
    prompt, target = FACTS[tiny.name]
    layer = tiny.n_layers - 1
    t = captum_target(tiny, prompt, target, layer)
    lig = LayerIntegratedGradients(t.forward_func, t.layer)
    attr = lig.attribute(t.inputs, baselines=t.baselines, n_steps=STEPS, method="riemann_right")
    ref = reference_ig(tiny, prompt, target, layer, STEPS)
    assert attr.shape == (1, tiny.d_mlp)
    assert (attr[0] - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_other_captum_layer_methods_accept_the_target(tiny):
    prompt, target = FACTS[tiny.name]
    t = captum_target(tiny, prompt, target, 1)
    res = KnowledgeAttribution(tiny).attribute(prompt, target, progress=False)
    act = LayerActivation(t.forward_func, t.layer).attribute(t.inputs)
    torch.testing.assert_close(act[0], res.activations[1], atol=1e-6, rtol=1e-5)
    gxa = LayerGradientXActivation(t.forward_func, t.layer).attribute(t.inputs)
    # gradient x activation equals the last Riemann term (alpha = 1) of IG times m
    ig1 = reference_ig(tiny, prompt, target, 1, 1)
    torch.testing.assert_close(gxa[0], ig1, atol=1e-7, rtol=1e-4)
    cond = LayerConductance(t.forward_func, t.layer).attribute(t.inputs, baselines=t.baselines, n_steps=200)
    gap = res.target_prob - res.zeroed_prob[1].item()
    assert cond.sum().item() == pytest.approx(gap, rel=0.05, abs=1e-6)


def test_multi_token_targets_agree_across_engines(tiny):
    prompt, target = MULTI[tiny.name]
    fast = KnowledgeAttribution(tiny, "fast").attribute(prompt, target, progress=False)
    ref = torch.stack([reference_ig(tiny, prompt, target, layer, STEPS) for layer in range(tiny.n_layers)])
    assert (fast.scores - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_completeness_improves_with_steps(tiny):
    prompt, target = FACTS[tiny.name]
    ka = KnowledgeAttribution(tiny)
    coarse = ka.attribute(prompt, target, steps=4, progress=False).completeness_gap.abs().max()
    fine = ka.attribute(prompt, target, steps=400, batch_size=100, progress=False)
    assert fine.completeness_gap.abs().max() < coarse
    delta = (fine.target_prob - fine.zeroed_prob).abs().max()
    assert fine.completeness_gap.abs().max() < 0.01 * delta


def test_riemann_grid_is_right_endpoints():
    assert riemann_alphas(4).tolist() == [0.25, 0.5, 0.75, 1.0]


def test_layer_subset_and_layers_per_pass(tiny):
    prompt, target = FACTS[tiny.name]
    ka = KnowledgeAttribution(tiny)
    full = ka.attribute(prompt, target, progress=False)
    part = ka.attribute(prompt, target, layers=[2, 0], layers_per_pass=1, progress=False)
    assert part.layers == (2, 0)
    assert torch.all(part.scores[1] == 0)
    torch.testing.assert_close(part.scores[[0, 2]], full.scores[[0, 2]], atol=1e-7, rtol=1e-4)


def test_engines_agree_on_zeroed_probabilities(tiny):
    prompt, target = MULTI[tiny.name]
    fast = KnowledgeAttribution(tiny, "fast").attribute(prompt, target, progress=False)
    ref = KnowledgeAttribution(tiny, "batched").attribute(prompt, target, progress=False)
    torch.testing.assert_close(fast.zeroed_prob, ref.zeroed_prob, rtol=1e-4, atol=1e-9)
    assert fast.target_prob == ref.target_prob


@pytest.mark.filterwarnings("ignore::kn_plugin.hardware.SlowPrecisionWarning")
@pytest.mark.parametrize("family,engine", [("llama", "stepper"), ("gemma3", "cached")])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_matmuls_verify_and_say_what_ran(family, engine, dtype):
    """Layer products in bf16/fp16, the rest in float32: scores near float32's, and the result
    says which dtypes ran."""
    from kn_plugin.tiny import tiny_family

    km = wrap(*tiny_family(family))
    ka = KnowledgeAttribution(km)
    full = ka.attribute("The capital of France is", " Paris", steps=8, progress=False)
    mixed = ka.attribute("The capital of France is", " Paris", steps=8, progress=False, matmul_dtype=dtype)
    assert full.extras["dtype"] == full.extras["matmul_dtype"] == "float32"
    assert (mixed.extras["dtype"], mixed.extras["matmul_dtype"], mixed.engine) == ("float32", dtype, engine)
    scale = full.scores.abs().max()
    diff = (mixed.scores - full.scores).abs().max()
    assert 0 < diff <= 0.05 * scale  # rounded products, not the float32 path run again
    auto = ka.attribute("The capital of France is", " Paris", steps="auto", grid="gausslegendre", progress=False,
                        matmul_dtype=dtype)
    assert auto.extras["matmul_dtype"] == dtype and auto.extras["steps_per_layer"]
    adaptive = ka.attribute("The capital of France is", " Paris", steps="adaptive", grid="gausslegendre",
                            tolerance=1e-5, progress=False, matmul_dtype=dtype)  # 1e-5: its layers refine
    assert (adaptive.extras["matmul_dtype"], adaptive.extras["rule"]) == (dtype, "adaptive")
    assert adaptive.extras["intervals"] and adaptive.engine == engine


@pytest.mark.filterwarnings("ignore::kn_plugin.hardware.SlowPrecisionWarning")
def test_mixed_precision_that_does_not_verify_runs_in_float32_loudly(tiny_models, monkeypatch):
    from kn_plugin.attribution import MIXED_TOLERANCE

    km = tiny_models["tiny-llama"]
    ka = KnowledgeAttribution(km)
    full = ka.attribute("The capital of France is", " Paris", steps=8, progress=False)
    monkeypatch.setitem(MIXED_TOLERANCE, torch.bfloat16, 0.0)
    with pytest.warns(KnowledgeNeuronWarning, match="bfloat16 matmuls.*running them in float32"):
        res = ka.attribute("The capital of France is", " Paris", steps=8, progress=False, matmul_dtype="bfloat16")
    assert res.extras["matmul_dtype"] == "float32" and res.engine == "stepper"
    assert torch.equal(res.scores, full.scores) and "bfloat16 matmuls" in res.extras["engine_notes"][0]
    assert "stepper" not in km.failed_paths  # a precision miss does not retire the engine
    with pytest.raises(KnowledgeNeuronError, match="matmul_dtype must be one of"):
        ka.attribute("The capital of France is", " Paris", steps=8, progress=False, matmul_dtype="int8")


@pytest.mark.filterwarnings("ignore::kn_plugin.hardware.SlowPrecisionWarning")
def test_locate_with_mixed_precision_records_it_and_keeps_old_folders(tiny_models, tmp_path):
    from kn_plugin import LocateConfig, locate, locate_many

    km = tiny_models["tiny-llama"]
    res = locate(km, ["The capital of France is", "France's capital is"], " Paris", matmul_dtype="float16",
                 progress=False)
    assert {a.extras["matmul_dtype"] for a in res.attributions} == {"float16"}
    assert "matmul_dtype" not in LocateConfig().identity()  # a folder of earlier runs keeps its identity
    assert LocateConfig(matmul_dtype="bfloat16").identity()["matmul_dtype"] == "bfloat16"
    facts = [{"prompts": ["The capital of France is"], "target": " Paris"}]
    list(locate_many(km, facts, out=tmp_path / "runs", progress=False))
    with pytest.raises(KnowledgeNeuronError, match="matmul_dtype"):  # other settings: refused, not mixed in
        list(locate_many(km, facts, out=tmp_path / "runs", progress=False, matmul_dtype="float16"))


def test_mixed_precision_says_when_it_is_slow_here_also_on_auto_steps(tiny_models, monkeypatch):
    from kn_plugin import hardware

    monkeypatch.setattr(hardware, "low_precision_speedup", lambda dtype, device_type: 0.01)
    ka = KnowledgeAttribution(tiny_models["tiny-llama"])
    for steps in (4, "auto", "adaptive"):
        with pytest.warns(hardware.SlowPrecisionWarning, match="0.01x"):
            ka.attribute("The capital of France is", " Paris", steps=steps, progress=False, matmul_dtype="bfloat16")


@pytest.mark.parametrize("rows,n,vocab", [(3, 1, 11), (4, 3, 7), (1, 2, 50)])
def test_cached_engine_target_log_prob_equals_autograd(rows, n, vocab):
    """The cached engine's lean log P(target) gives sequence_log_prob's values and the
    gradient autograd computes through log_softmax and indexing in float64 (float64, float32
    and bfloat16 logits, whose gradient comes back in their own dtype)."""
    from kn_plugin.attribution.engines.cached import _TargetLogProb

    def sequence_log_prob(logits, ids):  # autograd's, in float64
        logp = torch.log_softmax(logits.double(), dim=-1)
        return logp[:, torch.arange(len(ids)), torch.tensor(ids)].sum(-1)

    g = torch.Generator().manual_seed(rows * 100 + n * 10 + vocab)
    target_ids = tuple(torch.randint(vocab, (n,), generator=g).tolist())
    weights = torch.randn(rows, generator=g, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        logits = (3 * torch.randn(rows, n, vocab, generator=g, dtype=torch.float64)).to(dtype)
        a = logits.clone().requires_grad_()
        b = logits.clone().requires_grad_()
        got = _TargetLogProb.apply(a, torch.tensor(target_ids))
        want = sequence_log_prob(b, target_ids)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        (got.double() * weights).sum().backward()
        (want.double() * weights).sum().backward()
        assert a.grad.dtype == dtype
        torch.testing.assert_close(a.grad.double(), b.grad.double(), rtol=tol, atol=tol)
    logits = torch.randn(rows, n, vocab, generator=g, requires_grad=True)
    out = _TargetLogProb.apply(logits, torch.tensor(target_ids)).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per graph"):  # its saved tensor was overwritten
        out.backward()
