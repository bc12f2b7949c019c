import json

import pytest
import torch
from conftest import FACTS, all_hooks

from kn_plugin.cli import main
from kn_plugin.editing import (
    WeightEdit,
    erase_relation,
    neuron_shares,
    replacement_vector,
    shared_neurons,
    token_embedding,
    unchanged_since,
    update_fact,
    weight_snapshot,
)
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.evaluation import (
    intervention_effect,
    perplexity,
    random_neurons,
    relative_change,
    target_probs,
    update_measures,
)
from kn_plugin.interventions import amplify, fwd_hooks, scale_neurons, set_neurons, suppress
from kn_plugin.scoring import encode_fact

NEURONS = [(0, 3), (1, 5), (2, 7), (2, 8)]


def _state(model):
    return weight_snapshot(model)


def _assert_same_state(model, state):
    assert unchanged_since(state)
    assert not unchanged_since([(state[0][0], state[0][1] + 1)])  # the check can fail


def _site_input(model, fact, layer, **ctx):
    grabbed = {}
    handle = model.adapter.patch_site(layer, lambda a: grabbed.setdefault("a", a))
    try:
        with torch.no_grad():
            model.hf_model(fact.input_ids)
    finally:
        handle.remove()
    return grabbed["a"]


@pytest.mark.parametrize("factor", [0.0, 2.0, -1.5])
def test_scaling_equals_patching_by_hand(tiny, factor):
    prompt, target = FACTS[tiny.name]
    fact = encode_fact(tiny, prompt, target)
    act = _site_input(tiny, fact, 2)
    manual = act.clone()
    manual[0, fact.pred_pos, [7, 8]] *= factor

    def by_hand(a):
        return manual if a.shape == manual.shape else a

    handle = tiny.adapter.patch_site(2, by_hand)
    try:
        with torch.no_grad():
            expected = tiny.hf_model(fact.input_ids).logits
    finally:
        handle.remove()
    with scale_neurons(tiny, [(2, 7), (2, 8)], factor, position=fact.pred_pos), torch.no_grad():
        got = tiny.hf_model(fact.input_ids).logits
    torch.testing.assert_close(got, expected)
    with torch.no_grad():
        tl = tiny.bridge().run_with_hooks(
            fact.input_ids, fwd_hooks=fwd_hooks([(2, 7), (2, 8)], factor, position=fact.pred_pos))
    torch.testing.assert_close(tl, expected)


def test_suppress_amplify_and_set_all_positions(tiny):
    prompt, target = FACTS[tiny.name]
    fact = encode_fact(tiny, prompt, target)
    one = [(1, 5)]  # a single layer, so that no other activation of that layer moves
    for ctx, check in ((suppress(tiny, one, position=None), lambda a: a == 0),
                       (amplify(tiny, one, position=None), None),
                       (set_neurons(tiny, one, 5.0, position=None), lambda a: a == 5.0)):
        clean = _site_input(tiny, fact, 1)
        with ctx:
            a = _site_input(tiny, fact, 1)
        if check is None:
            torch.testing.assert_close(a[..., 5], 2 * clean[..., 5])
        else:
            assert bool(check(a[..., 5]).all())
        torch.testing.assert_close(a[..., 4], clean[..., 4])


def test_update_edit_and_undo_are_bit_exact(tiny):
    prompt, target = FACTS[tiny.name]
    new = " Rome" if not tiny.is_masked else "rome"
    state = _state(tiny)
    original = tiny.adapter.value_slots(2)[7].clone()
    edit = update_fact(tiny, NEURONS, target, new)
    e_old, _ = token_embedding(tiny, target)
    e_new, _ = token_embedding(tiny, new)
    with edit.applied(tiny):
        slot = tiny.adapter.value_slots(2)[7]
        torch.testing.assert_close(slot, original - e_old + 8 * e_new)
        # TransformerLens sees the edit through the shared W_out
        assert torch.equal(tiny.bridge().blocks[2].mlp.W_out[7], slot)
    _assert_same_state(tiny, state)


def test_sign_aware_update_flips_direction_for_negative_neurons(tiny):
    prompt, target = FACTS[tiny.name]
    new = " Rome" if not tiny.is_masked else "rome"
    fact = encode_fact(tiny, prompt, target)
    act = _site_input(tiny, fact, 2)[0, fact.pred_pos]
    neg, pos = (2, int(act.argmin())), (2, int(act.argmax()))
    assert act.min() < 0 < act.max()
    plain = update_fact(tiny, [neg, pos], target, new)
    aware = update_fact(tiny, [neg, pos], target, new, prompts=[prompt], lambda2=8.0)
    assert plain.slots == aware.slots
    d_plain, d_aware = plain.new - plain.old, aware.new - aware.old
    i_neg, i_pos = plain.slots.index(neg), plain.slots.index(pos)
    torch.testing.assert_close(d_aware[i_pos], d_plain[i_pos])   # positive activation: same
    torch.testing.assert_close(d_aware[i_neg], -d_plain[i_neg])  # negative activation: flipped


def test_norm_scaling_and_shared_neuron_skip(tiny):
    prompt, target = FACTS[tiny.name]
    new = " Rome" if not tiny.is_masked else "rome"
    edit = update_fact(tiny, NEURONS, target, new, scale="norm", lambda1=1, lambda2=0)
    e_old, _ = token_embedding(tiny, target)
    torch.testing.assert_close((edit.old - edit.new).norm(dim=-1), edit.old.norm(dim=-1))
    skip = update_fact(tiny, NEURONS, target, new, shared={(0, 3): 0.5, (1, 5): 0.05})
    assert (0, 3) not in skip.slots and (1, 5) in skip.slots


def test_multi_token_targets_use_the_first_token_embedding(tiny_models):
    m = tiny_models["tiny-llama"]
    ids = m.tokenizer(" France is", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    emb, first = token_embedding(m, " France is")
    assert first == ids[0] and torch.equal(emb, m.adapter.word_embeddings()[ids[0]])
    edit = update_fact(m, NEURONS, " Paris", " France is", lambda1=0.0, lambda2=1.0)
    torch.testing.assert_close(edit.new - edit.old, emb.expand_as(edit.old))


def test_neuron_shares():
    shares = neuron_shares([[(0, 1), (1, 2)], [(0, 1)], [(0, 1), (0, 1)], [(2, 2)]])
    assert shares == {(0, 1): 0.75, (1, 2): 0.25, (2, 2): 0.25}


def test_erase_relation_sets_unk_or_substitute_and_undoes(tiny):
    sets = [[(0, 1), (1, 2)], [(0, 1), (2, 3)], [(0, 1), (1, 2)], [(1, 2)]]
    assert shared_neurons(sets, 3) == [(0, 1, 3), (1, 2, 3)]
    state = _state(tiny)
    for replacement in ("auto", "zero", "mean"):
        edit = erase_relation(tiny, sets, min_facts=3, replacement=replacement)
        vec, _ = replacement_vector(tiny, replacement)
        with edit.applied(tiny):
            assert torch.equal(tiny.adapter.value_slots(0)[1], vec)
            assert torch.equal(tiny.adapter.value_slots(1)[2], vec)
        _assert_same_state(tiny, state)
    unk = tiny.tokenizer.unk_token_id
    assert torch.equal(replacement_vector(tiny, "unk")[0], tiny.adapter.word_embeddings()[unk])


def test_edit_file_roundtrip(tiny, tmp_path):
    prompt, target = FACTS[tiny.name]
    new = " Rome" if not tiny.is_masked else "rome"
    state = _state(tiny)
    edit = update_fact(tiny, NEURONS, target, new)
    edit.save(tmp_path / "e.pt")
    loaded = WeightEdit.load(tmp_path / "e.pt")
    assert loaded.slots == edit.slots and torch.equal(loaded.new, edit.new)
    handle = loaded.apply(tiny)
    assert torch.equal(tiny.adapter.value_slots(2)[7], edit.new[edit.slots.index((2, 7))])
    handle.revert()
    handle.revert()  # idempotent
    _assert_same_state(tiny, state)


def test_exception_inside_with_leaves_no_edit_and_no_hook(tiny):
    prompt, target = FACTS[tiny.name]
    new = " Rome" if not tiny.is_masked else "rome"
    state, hooks = _state(tiny), all_hooks(tiny.hf_model)
    with pytest.raises(RuntimeError):
        with update_fact(tiny, NEURONS, target, new).applied(tiny), \
                suppress(tiny, NEURONS, position=encode_fact(tiny, prompt, target)):
            raise RuntimeError("boom")
    _assert_same_state(tiny, state)
    assert all_hooks(tiny.hf_model) == hooks


def test_bad_edit_input(tiny_models):
    m = tiny_models["tiny-llama"]
    with pytest.raises(KnowledgeNeuronError, match="equals the old"):
        update_fact(m, NEURONS, " Paris", " Paris")
    with pytest.raises(KnowledgeNeuronError, match="out of range"):
        update_fact(m, [(0, 999)], " Paris", " Rome")
    with pytest.raises(KnowledgeNeuronError, match="out of range"):
        update_fact(m, [(9, 1)], " Paris", " Rome")
    with pytest.raises(KnowledgeNeuronError, match="no facts"):
        erase_relation(m, [])
    other = tiny_models["tiny-bert"]
    edit = update_fact(m, NEURONS, " Paris", " Rome")
    edit.n_layers += 1
    with pytest.raises(KnowledgeNeuronError, match="made for"):
        edit.apply(other)


def test_metrics(tiny):
    prompt, target = FACTS[tiny.name]
    assert relative_change([0.5, 0.3], [0.2, 0.2]) == pytest.approx(-0.5)
    rnd = random_neurons(NEURONS, tiny.d_mlp, seed=1)
    assert sorted(layer for layer, _ in rnd) == sorted(layer for layer, _ in NEURONS)
    assert not set(rnd) & set(NEURONS) and rnd == random_neurons(NEURONS, tiny.d_mlp, seed=1)
    facts = [encode_fact(tiny, prompt, target)]
    eff = intervention_effect(tiny, facts, NEURONS, 0.0, unrelated=facts)
    assert eff.relative_change == pytest.approx((eff.after[0] - eff.before[0]) / eff.before[0])
    assert eff.unrelated_after == eff.after
    ppl = perplexity(tiny, facts)
    assert ppl == pytest.approx(1 / target_probs(tiny, facts)[0] ** (1 / len(facts[0].target_ids)))


def test_update_measures_equal_plain_forwards_before_and_with_the_edit(tiny):
    prompt, target = FACTS[tiny.name]
    other = " Rome" if target.strip() != "Rome" else " Paris"
    old, new = [encode_fact(tiny, prompt, target)], [encode_fact(tiny, prompt, other)]
    controls = [encode_fact(tiny, prompt, other), encode_fact(tiny, prompt, target)]

    def by_hand():  # one plain forward per fact, log-softmax at the prediction position
        out = []
        for f in old + new + controls:
            with torch.no_grad():
                logits = tiny.hf_model(f.input_ids).logits[0, f.pred_pos].double()
            out.append((int(logits.argmax()), float(torch.log_softmax(logits, -1)[f.target_ids[0]])))
        return out

    edit = update_fact(tiny, NEURONS, target, other, lambda2=50.0)
    for applied in (False, True):
        if applied:
            with edit.applied(tiny):
                m, ref = update_measures(tiny, old, new, held=old, controls=controls), by_hand()
        else:
            m, ref = update_measures(tiny, old, new, held=old, controls=controls), by_hand()
        assert m["top"] == m["held_top"] == [ref[0][0]] and m["control_top"] == [ref[2][0], ref[3][0]]
        got = m["old_logp"] + m["new_logp"] + m["control_logp"]
        assert got == pytest.approx([lp for _, lp in ref], abs=1e-4)
    assert update_measures(tiny, [], [])["top"] == []


def test_cli_suppress_amplify_update_erase(tmp_path, capsys):
    neurons = tmp_path / "n.json"
    base = ["--model", "tiny-llama"]
    prompts = ["--prompt", "The capital of France is", "--prompt", "The capital city of France is"]
    assert main(["locate", *base, *prompts, "--target", " Paris", "--json", str(neurons), "--quiet",
                 "--adaptive"]) == 0
    for cmd in ("suppress", "amplify"):
        out = tmp_path / f"{cmd}.json"
        assert main([cmd, *base, "--neurons", str(neurons), *prompts, "--target", " Paris",
                     "--json", str(out)]) == 0
        data = json.loads(out.read_text())
        b, a = sum(data["before"]), sum(data["after"])
        assert data["relative_change"] == pytest.approx((a - b) / b)
    out, saved = tmp_path / "u.json", tmp_path / "u.pt"
    assert main(["edit", "update", *base, "--neurons", str(neurons), *prompts, "--old", " Paris",
                 "--new", " Rome", "--json", str(out), "--save", str(saved)]) == 0
    data = json.loads(out.read_text())
    assert {"old_before", "old_after", "new_before", "new_after", "top_after"} <= set(data)
    assert data["undo_exact"] is True and saved.exists()
    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join(json.dumps({"prompts": [p], "target": t}) for p, t in [
        ("The capital of France is", " Paris"), ("The capital of Germany is", " Berlin"),
        ("The capital of Italy is", " Rome")]))
    out = tmp_path / "e.json"
    assert main(["edit", "erase", *base, "--facts", str(facts), "--other", str(facts),
                 "--min-facts", "2", "--json", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert data["undo_exact"] is True and data["before"]["relation_ppl"] > 0


def test_cli_rejects_neurons_of_another_model(tmp_path, capsys):
    neurons = tmp_path / "n.json"
    assert main(["locate", "--model", "tiny-gpt2", "--prompt", "The capital of France is",
                 "--target", " Paris", "--json", str(neurons), "--quiet"]) == 0
    rc = main(["suppress", "--model", "tiny-llama", "--neurons", str(neurons), "--prompt", "a b",
               "--target", " c"])
    assert rc == 2 and "was made for model 'tiny-gpt2'" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    from kn_plugin.models import load_model

    bad.write_text(json.dumps({"fingerprint": load_model("tiny-llama").fingerprint,
                               "neurons": [{"layer": 0, "index": 10_000}]}))
    rc = main(["suppress", "--model", "tiny-llama", "--neurons", str(bad), "--prompt", "a b",
               "--target", " c"])
    assert rc == 2 and "out of range" in capsys.readouterr().err
    rc = main(["edit", "update", "--model", "tiny-llama", "--neurons", str(bad), "--prompt", "a b",
               "--old", " c", "--new", " c"])
    assert rc == 2
