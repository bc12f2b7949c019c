"""The constrained knowledge-neuron update and the key statistics it weighs by, against plain
loops (one text, one layer at a time), a brute-force check of minimum energy, and exact undo."""

import pytest
import torch

from kn_plugin.editing import constrained_update, read_slots
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.key_stats import corpus_keys, second_moment
from kn_plugin.rome import generated_corpus

PROMPTS = ["The capital of France is", "France's capital is", "The capital city of France is"]
OLD, NEW = " Paris", " Rome"
NEURONS = [(0, 3), (1, 7), (1, 20), (2, 5)]


def _keys(model, text, slots):
    """Activations [tokens, len(slots)] of one text, one hook per layer, read one at a time."""
    cols = []
    for layer, i in slots:
        seen = []
        h = model.adapter.patch_site(layer, lambda act, seen=seen: (seen.append(act[0].double()), act)[1])
        try:
            with torch.no_grad():
                model.hf_model(torch.tensor([model.tokenizer(text)["input_ids"]]))
        finally:
            h.remove()
        cols.append(seen[0][:, i])
    return torch.stack(cols, 1)


@pytest.fixture(scope="module")
def corpus(tiny_models):
    return generated_corpus(tiny_models["tiny-llama"], 30, 20, seed=5)


def test_second_moment_of_slots_across_layers_equals_a_plain_loop(tiny_models, corpus):
    model = tiny_models["tiny-llama"]
    mom2, n = second_moment(model, NEURONS, corpus, batch=7)
    k = torch.cat([_keys(model, t, NEURONS) for t in corpus])
    assert n == len(k)
    assert torch.allclose(mom2, k.T @ k / len(k), rtol=1e-6, atol=1e-9)
    cached = corpus_keys(model, corpus, batch=5)  # every neuron once, any slots later
    assert cached.keys.shape == (n, model.n_layers, model.d_mlp)
    again, n2 = cached.second_moment(NEURONS)
    assert n2 == n and torch.allclose(again, mom2, rtol=1e-6, atol=1e-9)


def test_constrained_update_from_cached_corpus_keys_equals_from_texts(tiny_models, corpus):
    model = tiny_models["tiny-llama"]
    a = constrained_update(model, NEURONS, OLD, NEW, PROMPTS, corpus)
    b = constrained_update(model, NEURONS, OLD, NEW, PROMPTS, corpus_keys(model, corpus))
    assert a[1:] == b[1:] and torch.allclose(a[0].new, b[0].new, rtol=1e-5, atol=1e-6)
    other = corpus_keys(tiny_models["tiny-gpt2"], corpus)
    with pytest.raises(KnowledgeNeuronError, match="another model"):
        constrained_update(model, NEURONS, OLD, NEW, PROMPTS, other)


def _prediction_key(model):
    from kn_plugin.scoring import encode_fact

    rows = []
    for p in PROMPTS:
        pos = encode_fact(model, p, OLD).pred_pos
        rows.append(_keys(model, p, NEURONS)[pos])
    return torch.stack(rows).mean(0)


def test_constrained_update_writes_exactly_d_with_the_least_energy(tiny_models, corpus):
    model = tiny_models["tiny-llama"]
    before = {n: t.clone() for n, t in model.hf_model.state_dict().items()}
    edit, lam, reached = constrained_update(model, NEURONS, OLD, NEW, PROMPTS, corpus, ridge=0.0)
    slots = [tuple(s) for s in edit.slots]
    assert sorted(slots) == sorted(NEURONS)
    old = read_slots(model, slots).double()
    dv = edit.new.double() - old
    order = [NEURONS.index(s) for s in slots]
    a = _prediction_key(model)[order]
    emb = model.adapter.word_embeddings()
    ids = [model.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (OLD, NEW)]
    d = lam * (emb[ids[1]] - emb[ids[0]]).double()
    assert torch.allclose(a @ dv, d, atol=1e-5)  # the mean key writes exactly d more
    k = torch.cat([_keys(model, t, NEURONS) for t in corpus])[:, order]
    C = k.T @ k / len(k)
    energy = torch.trace(dv.T @ C @ dv)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # any other change that writes d costs at least as much
        noise = torch.randn(dv.shape, generator=gen, dtype=torch.float64)
        noise -= torch.outer(a, a @ noise) / (a @ a)  # a^T noise = 0: still writes d
        other = dv + 0.1 * noise
        assert torch.allclose(a @ other, d, atol=1e-5)
        assert torch.trace(other.T @ C @ other) >= energy - 1e-9
    with edit.applied(model):
        from kn_plugin.scoring import encode_fact, top_prediction

        tops = [top_prediction(model, encode_fact(model, p, OLD)) for p in PROMPTS]
    assert reached == all(t == ids[1] for t in tops)
    assert edit.meta["rule"] == "constrained" and edit.meta["scale"] == lam
    after = model.hf_model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)  # left unedited, undone bit for bit


def test_constrained_update_refuses_bad_input(tiny_models, corpus):
    model = tiny_models["tiny-llama"]
    for args, match in (((NEURONS, OLD, OLD, PROMPTS, corpus), "equals the old"),
                        ((NEURONS, OLD, NEW, [], corpus), "needs the prompts"),
                        ((NEURONS, OLD, NEW, PROMPTS, []), "fewer than"),
                        (([(9, 0)], OLD, NEW, PROMPTS, corpus), "out of range"),
                        (([], OLD, NEW, PROMPTS, corpus), "no neurons")):
        with pytest.raises(KnowledgeNeuronError, match=match) as exc:
            constrained_update(model, *args)
        assert len(str(exc.value).splitlines()) == 1
    with pytest.raises(KnowledgeNeuronError, match="ladder"):
        constrained_update(model, NEURONS, OLD, NEW, PROMPTS, corpus, ladder=[0.0])


def test_kn_edit_update_constrained_equals_the_library_call(tiny_models, corpus, tmp_path, capsys, monkeypatch):
    """`kn edit update --constrained` makes the edit constrained_update makes, on the given
    corpus or on the CONSTRAINED_CORPUS texts the model writes; it refuses the other rules'
    settings and a corpus without --constrained, in one line."""
    import json

    from kn_plugin.cli import edit as cli_edit
    from kn_plugin.cli import main
    from kn_plugin.editing import CONSTRAINED_CORPUS, WeightEdit

    written = []  # the texts the command had the model write (sampling: they depend on the thread count)

    def recorded(model, n, tokens, *args, **kwargs):
        written.append(((n, tokens), generated_corpus(model, n, tokens, *args, **kwargs)))
        return written[-1][1]

    monkeypatch.setattr(cli_edit, "generated_corpus", recorded)

    model = tiny_models["tiny-llama"]
    neurons = tmp_path / "n.json"
    neurons.write_text(json.dumps({"fingerprint": model.fingerprint,
                                   "neurons": [{"layer": layer, "index": i} for layer, i in NEURONS]}))
    lines = [" ".join(t.split()) for t in corpus if t.split()]  # one text a line
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(lines))
    base = ["edit", "update", "--model", "tiny-llama", "--neurons", str(neurons), "--old", OLD, "--new", NEW]
    for p in PROMPTS:
        base += ["--prompt", p]
    for extra in (["--corpus", str(text)], []):
        saved, out = tmp_path / "e.pt", tmp_path / "e.json"
        assert main([*base, "--constrained", *extra, "--save", str(saved), "--json", str(out)]) == 0
        if extra:
            texts = lines
            assert written == []
        else:
            ((size, texts),) = written
            assert size == CONSTRAINED_CORPUS and len(texts) == CONSTRAINED_CORPUS[0]
        want = constrained_update(model, NEURONS, OLD, NEW, PROMPTS, texts)[0]
        got = WeightEdit.load(saved)
        assert got.slots == want.slots and torch.equal(got.new, want.new) and torch.equal(got.old, want.old)
        assert json.loads(out.read_text())["undo_exact"] is True
        assert "constrained, scale" in capsys.readouterr().out
        saved.unlink()
    bert = tmp_path / "bert.json"  # a masked LM writes no corpus of its own: it needs --corpus
    bert.write_text(json.dumps({"fingerprint": tiny_models["tiny-bert"].fingerprint,
                                "neurons": [{"layer": 0, "index": 1}]}))
    masked = ["edit", "update", "--model", "tiny-bert", "--neurons", str(bert), "--prompt", "Paris is the [MASK].",
              "--old", "capital", "--new", "city", "--constrained"]
    for args, message in (([*base, "--constrained", "--lambda2", "8"], "drop --lambda1"),
                          ([*base, "--corpus", str(text)], "--corpus is for --constrained"),
                          (masked, "give them with --corpus FILE")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("kn: error:") and message in err and len(err.strip().splitlines()) == 1
