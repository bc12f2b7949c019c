"""The rank-one editor (ROME) and the editing field's metrics, against hand computations."""

import math
import random

import pytest
import torch

from kn_plugin import edit_metrics as em
from kn_plugin import rome, v_star
from kn_plugin.cli import main
from kn_plugin.editing import WeightEdit, unchanged_since, weight_snapshot
from kn_plugin.errors import KnowledgeNeuronError

PROMPT, SUBJECT, OLD, NEW = "The capital of France is", "France", " Paris", " Rome"
FAST = rome.RomeConfig(steps=3)


@pytest.fixture(scope="module")
def llama_stats(tiny_models):
    model = tiny_models["tiny-llama"]
    corpus = rome.generated_corpus(model, 40, 32)
    return rome.key_statistics(model, 1, corpus, corpus="tiny corpus")


def test_key_statistics_are_the_mean_outer_product_of_every_token_key(tiny_models):
    model = tiny_models["tiny-llama"]
    texts = rome.generated_corpus(model, 30, 24, seed=3) + ["The capital of France is Paris ."]
    stats = rome.key_statistics(model, 2, texts, batch=7)
    keys = []  # plain loop: one text at a time, every position
    for t in texts:
        seen = []
        h = model.adapter.patch_site(2, lambda act, seen=seen: (seen.append(act[0].double()), act)[1])
        try:
            with torch.no_grad():
                model.hf_model(torch.tensor([model.tokenizer(t)["input_ids"]]))
        finally:
            h.remove()
        keys.append(seen[0])
    k = torch.cat(keys)
    assert stats.n_tokens == k.shape[0]
    # a padded batch and one text at a time agree to fp32 rounding
    torch.testing.assert_close(stats.mom2, k.T @ k / k.shape[0], rtol=1e-5, atol=1e-6)


def test_rank_one_edit_writes_v_star_for_k_star_and_leaves_orthogonal_keys(tiny_models, llama_stats):
    model = tiny_models["tiny-llama"]
    prefixes = rome.context_prefixes(model)[:4]
    key, value, _ = rome.rome_request(model, PROMPT, SUBJECT, NEW, 1, prefixes=prefixes, config=FAST)
    snapshot = weight_snapshot(model)
    edit = rome.rome_edit(model, PROMPT, SUBJECT, NEW, 1, llama_stats, prefixes=prefixes, config=FAST, old_target=OLD)
    assert unchanged_since(snapshot)  # made, not applied
    assert edit.kind == "rome" and edit.slots == [(1, i) for i in range(model.d_mlp)]
    site = model.adapter.site_module(1)
    c = torch.linalg.solve(llama_stats.mom2, key)
    gen = torch.Generator().manual_seed(0)
    others = torch.randn(8, model.d_mlp, generator=gen, dtype=torch.float64)
    others = others - (others @ c)[:, None] / (key @ c) * key  # k^T C^-1 k* = 0
    assert (others @ c).abs().max() < 1e-9
    with torch.no_grad():
        before = site(others.float())
        with edit.applied(model):
            written = site(key.float()[None])[0].double()
            after = site(others.float())
    scale = max(1.0, float(value.abs().max()))
    assert (written - value).abs().max() <= 1e-5 * scale  # W' k* = v*
    assert (after - before).abs().max() <= 1e-5 * max(1.0, float(before.abs().max()))
    assert unchanged_since(snapshot)  # undo: bit for bit


def test_rank_one_rows_equal_a_direct_solve():
    gen = torch.Generator().manual_seed(1)
    d_mlp, d_model = 12, 5
    V = torch.randn(d_mlp, d_model, generator=gen)
    b = torch.randn(d_model, generator=gen)
    K = torch.randn(200, d_mlp, generator=gen, dtype=torch.float64)
    C = K.T @ K / 200
    k, v = K[0], torch.randn(d_model, generator=gen, dtype=torch.float64)
    new = rome.rank_one_rows(V, b, C, k, v).double()
    # direct: minimise ||W' K - W K|| (in the C metric) subject to W' k = v - b, via the KKT system
    W = V.double().T  # [d_model, d_mlp]
    kkt = torch.zeros(d_mlp + 1, d_mlp + 1, dtype=torch.float64)
    kkt[:d_mlp, :d_mlp], kkt[:d_mlp, d_mlp], kkt[d_mlp, :d_mlp] = C, k, k
    rhs = torch.zeros(d_mlp + 1, d_model, dtype=torch.float64)
    rhs[:d_mlp] = (C @ W.T)
    rhs[d_mlp] = v - b.double()
    direct = torch.linalg.solve(kkt, rhs)[:d_mlp]  # rows of W'^T = the new value slots
    torch.testing.assert_close(new, direct, rtol=1e-5, atol=1e-5)


def test_saved_rome_edit_loads_applies_and_reverts(tiny_models, llama_stats, tmp_path):
    model = tiny_models["tiny-llama"]
    edit = rome.rome_edit(model, PROMPT, SUBJECT, NEW, 1, llama_stats, prefixes=[], config=FAST)
    path = edit.save(tmp_path / "rome.pt")
    again = WeightEdit.load(path)
    assert again.kind == "rome" and torch.equal(again.new, edit.new)
    snapshot = weight_snapshot(model)
    with again.applied(model):
        assert torch.equal(model.adapter.value_slots(1), edit.new)
    assert unchanged_since(snapshot)


def test_rome_bad_input_is_one_line(tiny_models, llama_stats):
    model = tiny_models["tiny-llama"]
    cases = [
        (dict(layer=1, old_target=" Rome"), "equals the old one"),
        (dict(layer=7), "out of range"),
        (dict(layer=0), "of layer 1"),
        (dict(layer=1, subject="Spain"), "does not occur"),
    ]
    for kwargs, match in cases:
        args = dict(prompt=PROMPT, subject=SUBJECT, new_target=NEW, stats=llama_stats, prefixes=[], config=FAST)
        args.update(kwargs)
        with pytest.raises(KnowledgeNeuronError, match=match) as exc:
            rome.rome_edit(model, **args)
        assert len(str(exc.value).splitlines()) == 1
    with pytest.raises(KnowledgeNeuronError, match="fewer than"):
        rome.key_statistics(model, 1, [])
    with pytest.raises(KnowledgeNeuronError, match="fewer than"):
        rome.key_statistics(model, 1, ["", "   "])
    with pytest.raises(KnowledgeNeuronError, match="masked LM"):
        rome.key_statistics(tiny_models["tiny-bert"], 1, ["a b c"] * 100)
    with pytest.raises(KnowledgeNeuronError, match="steps must be"):
        rome.RomeConfig(steps=0)
    with pytest.raises(KnowledgeNeuronError, match="lr must be"):
        rome.RomeConfig(lr=float("nan"))


def test_generation_is_seeded_and_keeps_the_global_random_state(tiny_models):
    model = tiny_models["tiny-gpt2"]
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    a = rome.generated_corpus(model, 3, 6, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a == rome.generated_corpus(model, 3, 6, seed=1) and len(a) == 3
    assert a != rome.generated_corpus(model, 3, 6, seed=2)


def test_causal_trace_equals_a_loop_over_samples_and_layers(tiny_models):
    model = tiny_models["tiny-llama"]
    effects = rome.trace_layers(model, PROMPT, SUBJECT, OLD, samples=3, window=1, seed=2)
    fact_ids = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])
    target = model.tokenizer(OLD, add_special_tokens=False)["input_ids"][0]
    enc = model.tokenizer(PROMPT, return_offsets_mapping=True)
    at = PROMPT.index(SUBJECT)
    subj = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < at + len(SUBJECT) and b > at and b > a]
    emb = model.hf_model.get_input_embeddings()
    gen = torch.Generator().manual_seed(2)
    sample = torch.randint(0, model.adapter.vocab_size, (4096,), generator=gen)
    std = float(emb(sample).float().std())
    eps = torch.randn((3, len(subj), model.adapter.d_model), generator=gen) * 3.0 * std
    clean = {}

    def p_target(s, restore_layer=None):
        handles = [emb.register_forward_hook(lambda m, a, out: torch.cat(
            [out[:, :subj[0]], out[:, subj[0]:subj[-1] + 1] + eps[s], out[:, subj[-1] + 1:]], 1))]
        if restore_layer is not None:
            def put(out):
                out = out.clone()
                out[0, subj[-1]] = clean[restore_layer]
                return out
            handles.append(model.adapter.patch_output(restore_layer, put))
        try:
            with torch.no_grad():
                logits = model.hf_model(fact_ids).logits
        finally:
            for h in handles:
                h.remove()
        return float(torch.softmax(logits[0, -1].float(), -1)[target])

    for layer in range(model.n_layers):
        seen = []
        h = model.adapter.patch_output(layer, lambda out, seen=seen: (seen.append(out[0, subj[-1]].clone()), out)[1])
        with torch.no_grad():
            model.hf_model(fact_ids)
        h.remove()
        clean[layer] = seen[0]
    corrupted = sum(p_target(s) for s in range(3)) / 3
    for layer in range(model.n_layers):
        restored = sum(p_target(s, layer) for s in range(3)) / 3
        assert math.isclose(effects[layer], restored - corrupted, rel_tol=1e-4, abs_tol=1e-6), layer


def test_metrics_equal_hand_computations():
    scores = {
        "rewrite": [{"new": 1.0, "true": 2.0}],
        "paraphrase": [{"new": 3.0, "true": 2.0}, {"new": 0.5, "true": 0.7}],
        "neighbourhood": [{"true": 1.0, "new": 4.0}, {"true": 2.0, "new": 1.5}, {"true": 0.1, "new": 0.2}],
    }
    m = em.case_metrics(scores)
    assert m["ES"] == 1.0 and math.isclose(m["EM"], math.exp(-1) - math.exp(-2))
    assert m["PS"] == 0.5 and math.isclose(m["PM"], ((math.exp(-3) - math.exp(-2)) + (math.exp(-0.5) - math.exp(-0.7))) / 2)
    assert math.isclose(m["NS"], 2 / 3)
    assert math.isclose(m["NM"], ((math.exp(-1) - math.exp(-4)) + (math.exp(-2) - math.exp(-1.5))
                                  + (math.exp(-0.1) - math.exp(-0.2))) / 3)
    other = em.case_metrics({"rewrite": [{"new": 2.0, "true": 1.0}], "paraphrase": [], "neighbourhood": []})
    assert other["ES"] == 0.0 and other["PS"] is None and other["NS"] is None
    s = em.summarize([m, other])
    assert s["ES"] == 0.5 and s["PS"] == 0.5 and math.isclose(s["NS"], 2 / 3)  # cases without a kind left out
    assert math.isclose(s["S"], 3 / (1 / 0.5 + 1 / 0.5 + 1.5))
    assert em.score(0.0, 0.5, 0.5) == 0.0 and em.score(None, 1, 1) is None


def test_ngram_entropy_equals_a_hand_count():
    text = "a b a b c ."
    # bigrams: ab x2, ba, bc, c. -> 5 ; trigrams: aba, bab, abc, bc. -> 4 distinct of 4
    h2 = -(2 / 5 * math.log2(2 / 5) + 3 * (1 / 5) * math.log2(1 / 5))
    h3 = math.log2(4)
    assert math.isclose(em.ngram_entropy_of(text), (2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert em.ngram_entropy_of("one") == 0.0
    assert math.isclose(em.ngram_entropy([text, "one"]), em.ngram_entropy_of(text) / 2)
    with pytest.raises(KnowledgeNeuronError):
        em.ngram_entropy([])


def test_mean_token_nll_is_the_teacher_forced_mean(tiny_models):
    model = tiny_models["tiny-llama"]
    prompt, target = "The capital of", " France is"
    p_ids = model.tokenizer(prompt)["input_ids"]
    t_ids = model.tokenizer(target, add_special_tokens=False)["input_ids"]
    assert len(t_ids) > 1
    total = 0.0
    for i, t in enumerate(t_ids):  # one forward per target token
        with torch.no_grad():
            logits = model.hf_model(torch.tensor([p_ids + t_ids[:i]])).logits[0, -1]
        total += -float(torch.log_softmax(logits.double(), -1)[t])
    assert math.isclose(em.mean_token_nll(model, prompt, target), total / len(t_ids), rel_tol=1e-5)


def test_edit_case_validation_and_evaluation(tiny_models, llama_stats):
    with pytest.raises(KnowledgeNeuronError, match="equals the old one"):
        em.EditCase(SUBJECT, PROMPT, OLD, " Paris ")
    with pytest.raises(KnowledgeNeuronError, match="does not name the subject"):
        em.EditCase("Spain", PROMPT, OLD, NEW)
    with pytest.raises(KnowledgeNeuronError, match="pair"):
        em.EditCase(SUBJECT, PROMPT, OLD, NEW, neighbours=("The capital of Spain is",))
    model = tiny_models["tiny-llama"]
    case = em.EditCase(SUBJECT, PROMPT, OLD, NEW, paraphrases=("France's capital is",),
                       neighbours=(("The capital of Spain is", " Madrid"),), generation_prompts=("France is",))
    edit = rome.rome_edit(model, PROMPT, SUBJECT, NEW, 1, llama_stats, prefixes=[], config=FAST)
    snapshot = weight_snapshot(model)
    ev = em.evaluate_edit(model, case, edit, tokens=8)
    assert unchanged_since(snapshot)
    assert ev.before["rewrite"][0]["new"] == pytest.approx(em.mean_token_nll(model, PROMPT, NEW))
    with edit.applied(model):
        assert ev.after["neighbourhood"][0]["true"] == pytest.approx(
            em.mean_token_nll(model, "The capital of Spain is", " Madrid"))
    assert ev.fluency_before is not None and ev.fluency_before >= 0
    assert set(ev.metrics_after) == {"ES", "EM", "PS", "PM", "NS", "NM"}


def test_kn_edit_rome_cli(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    rng = random.Random(0)
    words = "the capital of france is paris rome city people speak french in a large country".split()
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(20)) for _ in range(40)) + "\n")
    out = tmp_path / "edit.pt"
    argv = ["edit", "rome", "--model", "tiny-llama", "--prompt", PROMPT, "--subject", SUBJECT, "--old", OLD,
            "--new", NEW, "--layer", "1", "--corpus", str(corpus), "--steps", "3", "--save", str(out),
            "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "rank-one edit of layer 1" in text and "undo restored every weight bit for bit: True" in text
    assert WeightEdit.load(out).kind == "rome"
    for bad, match in ((["--layer", "9"], "out of range"), (["--new", OLD], "equals the old one"),
                       (["--corpus", str(tmp_path / "none.txt")], "cannot read"),
                       (["--subject", "Spain"], "does not occur")):
        args = list(argv[:-4])
        for flag, value in zip(bad[::2], bad[1::2]):
            args[args.index(flag) + 1] = value
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("kn: error:") and len(err.splitlines()) == 1 and match in err, err


def test_batched_mean_token_nlls_equal_one_pair_at_a_time(tiny_models):
    pairs = [("The capital of France is", " Paris"), ("Rome is", " the capital of Italy"),
             ("The capital city of Spain, a country in Europe, is", " Madrid"), ("A", " b c")]
    for name in ("tiny-llama", "tiny-gpt2"):
        model = tiny_models[name]
        alone = [em.mean_token_nll(model, p, t) for p, t in pairs]
        for batch in (1, 3, 32):
            got = em.mean_token_nlls(model, pairs, batch=batch)
            assert got == pytest.approx(alone, rel=1e-5, abs=1e-6), (name, batch)


def test_logits_at_equal_the_full_logits_at_those_positions(tiny_models):
    from kn_plugin.scoring import logits_at

    ids = torch.tensor([[3, 9, 4, 7, 1, 5], [2, 8, 6, 0, 0, 0]])
    for name in ("tiny-llama", "tiny-gpt2", "tiny-bert"):
        model = tiny_models[name]
        ids_m = ids.to(model.device) % model.hf_model.config.vocab_size
        with torch.no_grad():
            full = model.hf_model(ids_m).logits
            for positions in ([4], [0, 2, 5], [5, 1]):
                got = logits_at(model, ids_m, positions)
                assert got.shape == (2, len(positions), full.shape[-1]), name
                torch.testing.assert_close(got, full[:, positions], rtol=1e-5, atol=1e-6)
    with pytest.raises(KnowledgeNeuronError, match="distinct"):
        logits_at(tiny_models["tiny-llama"], ids, [1, 1])


def _unbridged(tiny_models, name):
    """``tiny_models[name]`` where no TransformerLens bridge has been booted on it, else a fresh copy:
    the bridge's attention wrappers keep no key/value cache, so the cached rows are unavailable."""
    from kn_plugin.models import load_model

    model = tiny_models[name]
    return model if model._bridge is None else load_model(name)


def _rows_of(model, prefixes=("Some text", "More text here", "a")):
    rewrites = rome._rewrites(model, PROMPT, SUBJECT, NEW, list(prefixes))
    kl_text = f"{SUBJECT} is a"
    return rewrites, model.tokenizer(kl_text)["input_ids"], rome.subject_token(model, kl_text, 0, SUBJECT)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "gemma3"])
def test_cached_v_star_rows_equal_the_full_forward_and_its_gradient(tiny_models, name):
    from kn_plugin.models import wrap
    from kn_plugin.tiny import tiny_family

    model = _unbridged(tiny_models, name) if name in tiny_models else wrap(*tiny_family(name))  # gemma3: window 4
    rewrites, kl_ids, kl_lookup = _rows_of(model)
    assert len({r.lookup for r in rewrites}) > 1  # rows of different lengths: left padding is exercised
    full = v_star._FullRows(model, 1, rewrites, kl_ids, kl_lookup)
    cached = v_star._CachedRows(model, 1, rewrites, kl_ids, kl_lookup)
    out = {}
    for rows in (full, cached):
        delta = torch.linspace(-1, 1, model.adapter.d_model).requires_grad_()
        kept = []
        with torch.enable_grad():
            nll, kl = rows(delta, kept.append)
            (nll.sum() + kl.exp()[:7].sum()).backward()
        out[rows.name] = (nll.detach(), kl.detach(), delta.grad, kept[0])
    for a, b in zip(out["full"], out["cached"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_v_star_of_the_cached_rows_equals_that_of_the_full_rows(tiny_models, monkeypatch):
    model = _unbridged(tiny_models, "tiny-llama")
    prefixes = ["Some text", "More text here"]
    cached = rome.rome_request(model, PROMPT, SUBJECT, NEW, 1, prefixes, FAST)
    assert cached[2]["rows"] == "cached"
    monkeypatch.setattr(v_star, "_CachedRows", v_star._FullRows)
    full = rome.rome_request(model, PROMPT, SUBJECT, NEW, 1, prefixes, FAST)
    torch.testing.assert_close(cached[1], full[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached[0], full[0])
    assert cached[2]["steps_run"] == full[2]["steps_run"]


def test_cached_v_star_rows_that_disagree_fall_back_loudly(tiny_models, monkeypatch):
    from kn_plugin.attribution import KnowledgeNeuronWarning

    model = _unbridged(tiny_models, "tiny-llama")
    prefixes = ["Some text", "More text here"]
    expected = rome.rome_request(model, PROMPT, SUBJECT, NEW, 1, prefixes, FAST)
    call = v_star._CachedRows.__call__
    monkeypatch.setattr(v_star._CachedRows, "__call__", lambda self, d, keep: tuple(
        x + 0.01 for x in call(self, d, keep)))
    with pytest.warns(KnowledgeNeuronWarning, match="differ from the model's full forward"):
        got = rome.rome_request(model, PROMPT, SUBJECT, NEW, 1, prefixes, FAST)
    assert got[2]["rows"] == "full"
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)

    def no_cache(self, *args):
        raise v_star._NoCache("TestModel keeps no key/value cache of the prefix")

    monkeypatch.setattr(v_star._CachedRows, "__init__", no_cache)
    with pytest.warns(KnowledgeNeuronWarning, match="no key/value cache"):
        assert rome.rome_request(model, PROMPT, SUBJECT, NEW, 1, prefixes, FAST)[2]["rows"] == "full"


def test_v_star_on_a_model_with_a_transformer_lens_bridge_recomputes_every_position_loudly():
    """A booted bridge wraps the attention modules, which then keep no key/value cache: v* says so
    and comes out as on the model without the bridge."""
    from kn_plugin.attribution import KnowledgeNeuronWarning
    from kn_plugin.models import load_model

    model = load_model("tiny-llama")
    prefixes = ["Some text", "More text here"]
    expected = rome.rome_request(model, PROMPT, SUBJECT, NEW, 1, prefixes, FAST)
    assert expected[2]["rows"] == "cached"
    model.bridge()
    with pytest.warns(KnowledgeNeuronWarning, match="no key/value cache"):
        got = rome.rome_request(model, PROMPT, SUBJECT, NEW, 1, prefixes, FAST)
    assert got[2]["rows"] == "full"
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)
