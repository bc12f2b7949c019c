"""Slow tests on the real default model, SmolLM2-135M-Instruct."""

import json

import pytest
import torch

from kn_plugin.attribution import KnowledgeAttribution
from kn_plugin.cli import main
from kn_plugin.integrations.transformer_lens import hook_name
from kn_plugin.interventions import fwd_hooks
from kn_plugin.scoring import encode_fact, target_log_prob

pytestmark = pytest.mark.slow
PARIS = ["The capital of France is", "The capital city of France is", "The French capital is"]
CHECK_LAYERS = (0, 1, 15, 28, 29)


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
        # the reference on the first, a middle and the last layers (all 30 cost it ~10x longer)
        ref = ka_ref.attribute(prompt, " Paris", layers=list(CHECK_LAYERS), progress=False)
        assert fast.layers == tuple(range(30)) and ref.layers == CHECK_LAYERS
        rows = list(CHECK_LAYERS)  # the other layers' rows of ref are left at zero
        assert (fast.scores[rows] - ref.scores[rows]).abs().max() <= 1e-4 * ref.scores.abs().max()


def test_locate_paris_suppress_with_tl_hook_and_edit_update(smollm2, tmp_path):
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
    # the same neurons file moves the fact by `kn edit update` (one locate serves both checks)
    report = tmp_path / "u.json"
    update = ["edit", "update", "--model", "smollm2", "--neurons", str(out), "--old", " Paris", "--new",
              " Rome", "--json", str(report)]
    for p in PARIS:
        update += ["--prompt", p]
    assert main(update) == 0
    data = json.loads(report.read_text())
    per = data["per_prompt"]
    assert data["sign_aware"] and data["undo_exact"] is True
    assert per["new_after"][0] > per["old_after"][0]


def test_capital_neurons_suppress_amplify_and_update(smollm2):
    from kn_plugin.data import DEMO_FACTS
    from kn_plugin.editing import update_fact
    from kn_plugin.evaluation import intervention_effect, relative_change, target_probs
    from kn_plugin.locating import locate

    before, supp, rand_supp, amp = [], [], [], []
    for fact in [f for f in DEMO_FACTS if f.relation == "capital" and f.subject != "Germany"]:  # 6 prompts
        res = locate(smollm2, list(fact.prompts), fact.target, adaptive=True, progress=False)
        assert 1 <= len(res.neurons) <= 30
        facts = [encode_fact(smollm2, p, fact.target) for p in fact.prompts]
        s = intervention_effect(smollm2, facts, res.neurons, 0.0, random_draws=5)
        a = intervention_effect(smollm2, facts, res.neurons, 2.0, random_draws=5)
        assert s.relative_change < -0.5, (fact.target, s.relative_change)
        before += s.before
        supp += s.after
        rand_supp += s.random_after
        amp += a.after
        # update <subject, capital, t> -> <subject, capital, Rome / Madrid>
        new = " Madrid" if fact.target == " Rome" else " Rome"
        new_facts = [encode_fact(smollm2, p, new) for p in fact.prompts]
        p_new_before = target_probs(smollm2, new_facts)
        with update_fact(smollm2, res.neurons, fact.target, new, prompts=fact.prompts).applied(smollm2):
            p_new_after = target_probs(smollm2, new_facts)
        assert sum(p_new_after) > 10 * sum(p_new_before) and min(p_new_after) > 0.5
    assert relative_change(before, supp) < -0.5
    assert abs(relative_change(before, rand_supp)) < 0.05
    assert relative_change(before, amp) > 0.1


def test_demo_runs_on_the_default_model(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--facts", "1", "--quiet"]) == 0
    data = json.loads((tmp_path / "demo.json").read_text())
    fact = data["facts"][0]
    assert fact["model"] == "smollm2" and fact["neurons"]
    assert max(fact["suppressed_prob"]) < min(fact["target_prob"])


def test_same_neurons_from_bridge_hf_module_and_registry(smollm2):
    from kn_plugin import locate, wrap

    bridge = smollm2.bridge()
    hf_model, tok = smollm2.hf_model, smollm2.tokenizer
    hf_model.train()  # a user's module in training mode: used in eval mode, given back in training mode
    try:
        # two prompts: a refined set, from the three entry points
        by_bridge = locate(bridge, PARIS[:2], " Paris", adaptive=True, progress=False)
        by_hf = locate(hf_model, PARIS[:2], " Paris", adaptive=True, progress=False, tokenizer=tok)
        assert all(m.training for m in hf_model.modules())
    finally:
        hf_model.eval()
    by_name = locate("smollm2", PARIS[:2], " Paris", adaptive=True, progress=False)
    assert wrap(bridge).tokenizer("The capital")["input_ids"] == tok("The capital")["input_ids"]
    keys = [n.key for n in by_name.neurons]
    assert keys and [n.key for n in by_bridge.neurons] == keys == [n.key for n in by_hf.neurons]
    for other in (by_bridge, by_hf):
        for a, b in zip(other.attributions, by_name.attributions):
            assert a.engine == b.engine == "stepper"
            assert (a.scores - b.scores).abs().max() <= 1e-6 * b.scores.abs().max()
    # bridge.to_tokens prepends a BOS that SmolLM2's tokenizer does not add to text: kept, with a warning
    tokens = bridge.to_tokens(PARIS[0])
    assert tokens[0, 0].item() == tok.bos_token_id
    with pytest.warns(UserWarning, match="BOS"):
        fact = encode_fact(bridge, tokens, " Paris")
    assert torch.equal(fact.input_ids.cpu(), tokens.cpu())


def test_cached_engine_and_bf16_on_smollm2():
    from kn_plugin import load_model

    model = load_model("smollm2")  # without a TransformerLens bridge, whose attention skips the cache
    fact = ("The capital city of France is", " Paris")
    layers = list(CHECK_LAYERS)  # the engines are layer by layer: a few layers test them (all: ~10x longer)
    ref = KnowledgeAttribution(model, "batched").attribute(*fact, layers=layers, progress=False)
    cached = KnowledgeAttribution(model, "cached").attribute(*fact, layers=layers, progress=False)
    assert cached.engine == "cached" and cached.layers == ref.layers == CHECK_LAYERS
    assert (cached.scores - ref.scores).abs().max() <= 1e-4 * ref.scores.abs().max()
    half = load_model("smollm2", dtype="bfloat16")
    # neuron files and edits of this model serve its bf16 and fp16 loads (signature: sign bits)
    assert half.fingerprint == model.fingerprint and half.signature == model.signature
    assert load_model("smollm2", dtype="float16").signature == model.signature
    res = KnowledgeAttribution(half).attribute(*fact, layers=layers, progress=False)
    assert res.engine in ("stepper", "cached")
    top = set(ref.scores.flatten().topk(10).indices.tolist())
    assert len(top & set(res.scores.flatten().topk(10).indices.tolist())) >= 7
    assert (res.scores - ref.scores).abs().max() <= 0.1 * ref.scores.abs().max()


GREECE = ["The capital of Greece is", "The capital city of Greece is", "The capital of Greece is the city of"]


def test_default_locate_answers_for_greece(tmp_path, capsys):
    argv = ["locate", "--model", "smollm2", "--target", " Athens", "--quiet", "--json", str(tmp_path / "g.json")]
    for p in GREECE:
        argv += ["--prompt", p]
    assert main(argv) == 0
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["adaptive"] and 1 <= len(data["neurons"]) <= 30, data["share"]
    capsys.readouterr()
    assert main(argv[:-2] + ["--share", "0.7"]) == 0
    out = capsys.readouterr().out
    n_fixed = int(next(line for line in out.splitlines() if "knowledge neurons" in line).split()[0])
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == (0 if 2 <= n_fixed <= 5 else 1)
    if n_fixed == 0:
        assert "lower --share" in notes[0]


def test_gauss_legendre_and_auto_steps_on_france(tmp_path, capsys):
    from captum.attr import LayerIntegratedGradients

    from kn_plugin import captum_target, load_model

    out = tmp_path / "gl.json"
    assert main(["locate", "--model", "smollm2", "--prompt", "The capital of France is", "--target", " Paris",
                 "--grid", "gausslegendre", "--steps", "20", "--quiet", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    gaps = data["completeness_gap"][0]
    # below 1e-3 on every layer but the first, where P(alpha) jumps from ~0.01 to ~0.67 between
    # alpha = 0.30 and 0.45: there Captum's own Gauss-Legendre leaves the same gap as ours
    assert len(gaps) == 30 and max(abs(g) for g in gaps[1:]) < 1e-3
    assert "largest completeness gap" in capsys.readouterr().out
    model = load_model("smollm2")
    t = captum_target(model, "The capital of France is", " Paris", layer=0)
    captum = LayerIntegratedGradients(t.forward_func, t.layer).attribute(
        t.inputs, baselines=t.baselines, n_steps=20, method="gausslegendre")
    prob = data["target_prob"][0]
    zeroed = data["attributions"][0]["zeroed_prob"][0]
    assert captum.sum().item() - (prob - zeroed) == pytest.approx(gaps[0], rel=1e-2)
    assert main(["locate", "--model", "smollm2", "--prompt", "The capital of France is", "--target", " Paris",
                 "--steps", "auto", "--tolerance", "0.05", "--quiet"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("steps auto for"))
    tried = [(int(part.split(":")[0].split("=")[1]), float(part.split(":")[1])) for part in
             line.split(": worst gap / layer effect ")[1].split(" -> ")[0].split(", ")]
    used = int(line.rsplit("m = ", 1)[1].split()[0])
    assert tried[-1][0] == used and tried[-1][1] <= 0.05 and all(gap > 0.05 for _, gap in tried[:-1])
    # each layer stops at its own m: the counts printed add up to the 30 layers
    spread = line.split("(layers: ")[1].rstrip(")").split(", ")
    assert sum(int(part.split(" at ")[0]) for part in spread) == 30 and f"at m={used}" in spread[-1]


def test_locate_facts_equals_single_locate_calls(tmp_path):
    from kn_plugin.data import DEMO_FACTS
    from kn_plugin.locating import LocateResult

    facts = DEMO_FACTS[:2]  # two facts: the folder holds each under its key (two prompts each)
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps({"prompts": list(f.prompts[:2]), "target": f.target,
                                        "key": f"{f.subject}-{f.relation}"}) + "\n" for f in facts))
    out = tmp_path / "out"
    assert main(["locate", "--model", "smollm2", "--facts", str(path), "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.glob("*.json")) == sorted(f"{f.subject}-{f.relation}.json" for f in facts)
    for f in facts:
        single = tmp_path / f"{f.subject}.json"
        argv = ["locate", "--model", "smollm2", "--target", f.target, "--json", str(single), "--quiet"]
        for p in f.prompts[:2]:
            argv += ["--prompt", p]
        assert main(argv) == 0
        a, b = LocateResult.load(out / f"{f.subject}-{f.relation}.json"), LocateResult.load(single)
        assert a.neurons and [(n.key, n.score) for n in a.neurons] == [(n.key, n.score) for n in b.neurons]
        assert a.target_prob == b.target_prob and a.share == b.share and a.prompts == b.prompts
        for x, y in zip(a.attributions, b.attributions):
            assert torch.equal(x.scores, y.scores)
