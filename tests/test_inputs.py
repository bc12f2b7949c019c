"""Input classes that must end in one KnowledgeNeuronError line (or a correct result), in the
Python API and the CLI, and property tests of the validators."""

import copy
import math
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kn_plugin import KnowledgeAttribution, assess, fwd_hooks, locate, set_neurons, suppress
from kn_plugin.attribution import GRIDS, integration_grid
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.interventions import _apply
from kn_plugin.models import parse_device
from kn_plugin.validation import MAX_STEPS, finite, integer, positive_int

PROMPT, TARGET = "The capital of France is", " Paris"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kn_plugin.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def _in_process(capsys, *args):
    """The CLI in this process (no interpreter start-up): the same ``main`` as ``_cli`` runs."""
    from types import SimpleNamespace

    from kn_plugin.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)


# --- property tests of the validators ---------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.text(max_size=3),
                 st.none()))
def test_finite_accepts_exactly_the_finite_real_numbers(value):
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
    if ok:
        assert finite("x", value) == float(value)
    else:
        with pytest.raises(KnowledgeNeuronError, match="^x must be a finite number"):
            finite("x", value)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.text(max_size=3)))
def test_integer_and_positive_int_accept_exactly_plain_integers(value):
    plain = isinstance(value, int) and not isinstance(value, bool)
    if plain:
        assert integer("n", value) == value
    else:
        with pytest.raises(KnowledgeNeuronError, match="^n must be an integer"):
            integer("n", value)
    if plain and value >= 1:
        assert positive_int("n", value) == value
    else:
        with pytest.raises(KnowledgeNeuronError):
            positive_int("n", value)


@settings(max_examples=150, deadline=None)
@given(length=st.integers(1, 6), width=st.integers(1, 6), position=st.one_of(st.none(), st.integers(-9, 9)),
       indices=st.lists(st.integers(-9, 9), min_size=1, max_size=4))
def test_hook_application_refuses_exactly_what_plain_indexing_cannot_reach(length, width, position, indices):
    act = torch.arange(length * width, dtype=torch.float32).reshape(1, length, width)
    idx = torch.tensor(indices)
    reachable = all(0 <= i < width for i in indices) and (position is None or -length <= position < length)
    if not reachable:
        with pytest.raises(KnowledgeNeuronError, match="out of range"):
            _apply(act, idx, position, 0.0, None)
        return
    out = _apply(act, idx, position, 0.0, None)
    expected = act.clone()  # a plain loop over the cells the intervention may touch
    for pos in (range(length) if position is None else [position % length]):
        for i in set(indices):
            expected[0, pos, i] = 0.0
    assert torch.equal(out, expected)


# --- steps and grids --------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [g for g in GRIDS if g != "riemann_trapezoid"])
def test_one_step_rules_are_the_plain_one_point_rules(grid):
    alphas, weights = integration_grid(grid, 1)
    assert alphas.tolist() == [{"riemann_right": 1.0, "riemann_left": 0.0}.get(grid, 0.5)]
    assert weights is None or torch.allclose(weights, torch.ones(1, dtype=weights.dtype))


def test_steps_beyond_the_cap_and_auto_with_one_step(tiny_models):
    ka = KnowledgeAttribution(tiny_models["tiny-llama"])
    for kwargs in ({"steps": MAX_STEPS + 1}, {"batch_size": 2 ** 63}, {"steps": "auto", "max_steps": 10 ** 9}):
        with pytest.raises(KnowledgeNeuronError, match="at most"):
            ka.attribute(PROMPT, TARGET, progress=False, **kwargs)
    with pytest.raises(KnowledgeNeuronError, match="trapezoid rule needs max_steps >= 2"):
        ka.attribute(PROMPT, TARGET, steps="auto", max_steps=1, grid="riemann_trapezoid", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for grid in ("riemann_right", "riemann_middle", "gausslegendre"):
            res = ka.attribute(PROMPT, TARGET, steps="auto", max_steps=1, grid=grid, progress=False)
            assert res.steps == 1
    one = ka.attribute(PROMPT, TARGET, steps=1, progress=False)  # right rule, one point: a * grad at alpha = 1
    again = ka.attribute(PROMPT, TARGET, steps=1, progress=False, grid="riemann_right")
    assert torch.equal(one.scores, again.scores) and one.scores.abs().sum() > 0
    r = _cli("locate", "--model", "tiny-llama", "--prompt", PROMPT, "--target", TARGET, "--steps", "1" + "0" * 30)
    assert r.returncode == 2 and r.stderr.strip().startswith("kn: error:") and "at most" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# --- devices, text, tokens --------------------------------------------------------------------

def test_devices_this_build_cannot_use_are_one_line():
    for device in ("mps", "cuda:7", "junk"):
        if device.startswith("cuda") and torch.cuda.device_count() > 7:
            continue
        if device == "mps" and torch.backends.mps.is_available():
            continue
        with pytest.raises(KnowledgeNeuronError):
            parse_device(device)
    r = _cli("locate", "--model", "tiny-llama", "--device", "mps", "--prompt", PROMPT, "--target", TARGET)
    if not torch.backends.mps.is_available():
        assert r.returncode == 2 and r.stderr.startswith("kn: error:") and len(r.stderr.strip().splitlines()) == 1


def test_text_that_is_not_valid_unicode_is_refused(tiny_models):
    m = tiny_models["tiny-llama"]
    with pytest.raises(KnowledgeNeuronError, match="not valid Unicode"):
        assess(m, "The capital \ud800 of France is", TARGET)
    with pytest.raises(KnowledgeNeuronError, match="not valid Unicode"):
        assess(m, PROMPT, " Pa\udcffris")
    r = subprocess.run([sys.executable.encode(), b"-m", b"kn_plugin.cli", b"locate", b"--model", b"tiny-llama",
                        b"--prompt", b"The \xff capital is", b"--target", b" c"], capture_output=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith(b"kn: error:") and b"not valid Unicode" in r.stderr


def test_padded_token_ids_are_refused_and_unpadded_ones_kept(tiny_models):
    m = tiny_models["tiny-gpt2"]
    bridge = m.bridge()
    batch = bridge.to_tokens([PROMPT, "Paris is the capital of the country of"])
    assert (batch[0] == m.tokenizer.pad_token_id).any()  # the shorter prompt is padded
    with pytest.raises(KnowledgeNeuronError, match="pad token"):
        locate(bridge, batch, TARGET, progress=False)
    long = "Paris is the capital of the country of"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = locate(bridge, batch[1:], TARGET, progress=False)  # the longest prompt carries no padding
        own = locate(bridge, bridge.to_tokens(long), TARGET, progress=False)
    assert torch.equal(row.attributions[0].scores, own.attributions[0].scores)


def test_a_tokenizer_beyond_the_models_vocabulary_is_one_line(tiny_models):
    m = tiny_models["tiny-llama"]
    tok = copy.deepcopy(m.tokenizer)
    tok.add_tokens(["zzzqqq"])
    with pytest.raises(KnowledgeNeuronError, match="beyond the model's vocabulary"):
        assess(m.hf_model, "The capital zzzqqq of France is", TARGET, tokenizer=tok)
    assert assess(m.hf_model, PROMPT, TARGET, tokenizer=tok).prob > 0  # prompts inside the vocabulary work


# --- interventions out of range ---------------------------------------------------------------

def test_out_of_range_positions_and_indices_in_context_managers_and_tl_hooks(tiny_models):
    m = tiny_models["tiny-llama"]
    ids = m.tokenizer(PROMPT, return_tensors="pt").input_ids
    n = ids.shape[1]
    hooks = lambda: [(len(mod._forward_hooks), len(mod._forward_pre_hooks)) for mod in m.hf_model.modules()]  # noqa: E731
    before = hooks()
    for cm in (lambda: suppress(m, [(0, 1)], position=n), lambda: suppress(m, [(0, 1)], position=-n - 1),
               lambda: set_neurons(m, [(0, 1), (0, 2)], value=torch.ones(5))):
        with pytest.raises(KnowledgeNeuronError):
            with cm():
                m.hf_model(ids)
    assert hooks() == before  # removed also when raising
    bridge = m.bridge()
    for hooks in (fwd_hooks([(0, m.d_mlp)]), fwd_hooks([(0, -1)]), fwd_hooks([(0, 3)], position=n)):
        with pytest.raises(KnowledgeNeuronError, match="out of range"):
            bridge.run_with_hooks(ids, fwd_hooks=hooks)
    assert torch.allclose(bridge(ids), m.hf_model(ids).logits, atol=1e-5)  # no hook left behind


# --- the model cache ------------------------------------------------------------------------

def test_cache_that_cannot_be_written_and_a_damaged_cached_model(tmp_path):
    import os

    blocker = tmp_path / "a-file"
    blocker.write_text("user data")
    for cache in (blocker, blocker / "sub"):
        env = {**os.environ, "KN_PLUGIN_CACHE": str(cache)}
        r = _cli("locate", "--model", "tiny-llama", "--prompt", PROMPT, "--target", TARGET, "--quiet", env=env)
        assert r.returncode == 2 and r.stderr.startswith("kn: error: cannot write the model cache")
    assert blocker.read_text() == "user data"
    env = {**os.environ, "KN_PLUGIN_CACHE": str(tmp_path / "cache")}
    assert _cli("locate", "--model", "tiny-llama", "--prompt", PROMPT, "--target", TARGET, "--quiet",
                env=env).returncode == 0
    (weights,) = (tmp_path / "cache").glob("*/model.safetensors")
    good = _cli("locate", "--model", "tiny-llama", "--prompt", PROMPT, "--target", TARGET, "--quiet", env=env)
    with open(weights, "r+b") as f:
        f.truncate(5000)
    r = _cli("locate", "--model", "tiny-llama", "--prompt", PROMPT, "--target", TARGET, "--quiet", env=env)
    assert r.returncode == 0 and r.stdout == good.stdout  # rebuilt, same model
    assert weights.stat().st_size > 5000
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # the damaged copy is gone


# --- data files, inspect, plots ---------------------------------------------------------------

def _one_line_error(r, text):
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("kn: error:") and text in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_damaged_pararel_files_and_unknown_relations_are_one_line(tmp_path, capsys):
    root = tmp_path / "pararel"
    (root / "patterns").mkdir(parents=True)
    (root / "facts").mkdir()
    patterns, facts = root / "patterns" / "P1.jsonl", root / "facts" / "P1.jsonl"
    four = "".join(f'{{"pattern": "[X] {v} [Y] ."}}\n' for v in ("is in", "lives in", "sits in", "is found in"))
    cases = [
        ('{"pattern": "[X] is in [Y] ."}\n{"pattern": "[X] lives in', '{"sub_label": "A", "obj_label": "B"}\n',
         "line 2: not JSON"),
        (four, '{"sub_label": "A"}\n', "no text field 'obj_label'"),
        (four, b"\xff\xfe", "is not UTF-8 text"),
    ]
    for pattern_text, fact_text, message in cases:
        patterns.write_text(pattern_text)
        facts.write_bytes(fact_text if isinstance(fact_text, bytes) else fact_text.encode())
        _one_line_error(_in_process(capsys, "inspect", "--model", "tiny-llama", "--neuron", "0:1", "--pararel",
                                    str(root)), message)
        _one_line_error(_in_process(capsys, "bench", "pararel", "--model", "tiny-llama", "--pararel", str(root),
                                    "--out", str(tmp_path / "run")), message)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.json"))
    _one_line_error(_cli("inspect", "--model", "tiny-llama", "--neuron", "0:1", "--pararel", "../shared/pararel",
                         "--relations", "P9999"), "unknown PARAREL relations ['P9999']")


def test_inspect_refuses_a_sentence_past_the_context_and_latex_plots(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a short sentence\n" + "word " * 200 + "\n")
    _one_line_error(_cli("inspect", "--model", "tiny-gpt2", "--neuron", "0:1", "--corpus", str(corpus)),
                    "sentence 2 is")
    import shutil

    import matplotlib

    if shutil.which(matplotlib.rcParams["pgf.texsystem"]) is None:
        _one_line_error(_cli("inspect", "--model", "tiny-gpt2", "--neuron", "0:1", "--corpus", str(corpus),
                             "--plot", str(tmp_path / "h.pgf")), "use one of")
        with pytest.raises(KnowledgeNeuronError, match="use one of"):
            from kn_plugin.plotting import _pyplot, _save

            _save(_pyplot().figure(), tmp_path / "x.pgf")
        assert not (tmp_path / "x.pgf").exists() and not (tmp_path / "h.pgf").exists()


# --- crafted edit files -----------------------------------------------------------------------

def test_crafted_edit_files_are_refused_before_any_write(tiny_models, tmp_path, capsys):
    from kn_plugin.editing import WeightEdit, update_fact

    m = tiny_models["tiny-llama"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edit = update_fact(m, [(0, 1), (1, 2)], TARGET, " Rome")
    good = edit.save(tmp_path / "edit.pt")
    before = m.weights_digest()
    changes = {
        "out of range": lambda d: d.__setitem__("slots", [(0, m.d_mlp), (1, 2)]),
        "negative": lambda d: d.__setitem__("slots", [(0, -1), (1, 2)]),
        "no fingerprint": lambda d: d.pop("fingerprint"),
        "float slot": lambda d: d.__setitem__("slots", [(0, 1.5), (1, 2)]),
        "short rows": lambda d: d.__setitem__("new", d["new"][:1]),
        "nan rows": lambda d: d["new"].__setitem__((0, 0), float("nan")),
        "triple": lambda d: d.__setitem__("slots", [(0, 1, 3), (1, 2)]),
    }
    for name, change in changes.items():
        data = torch.load(good, weights_only=True)
        change(data)
        path = tmp_path / f"{name}.pt"
        torch.save(data, path)
        with pytest.raises(KnowledgeNeuronError):
            WeightEdit.load(path).apply(m)
        assert m.weights_digest() == before, name
        run = _cli if name == "out of range" else lambda *a: _in_process(capsys, *a)  # one in a fresh process
        r = run("edit", "apply", "--model", "tiny-llama", "--edit", str(path), "--out", str(tmp_path / name))
        _one_line_error(r, "edit")
        assert not (tmp_path / name).exists()
    with WeightEdit.load(good).applied(m):  # the untouched file still applies
        assert m.weights_digest() != before
    assert m.weights_digest() == before


def test_float16_refuses_a_target_whose_integrand_underflows(tiny_models):
    from kn_plugin.attribution import FP16_MIN_PROB
    from kn_plugin.models import load_model as load

    prompt, low = PROMPT, " zzz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = KnowledgeAttribution(tiny_models["tiny-llama"]).attribute(prompt, low, progress=False)
        half = KnowledgeAttribution(load("tiny-llama", dtype="float16"))
        assert fp32.target_prob < FP16_MIN_PROB and fp32.scores.abs().max() > 0  # fp32 sees the neurons
        with pytest.raises(KnowledgeNeuronError, match="below float16's smallest normal"):
            half.attribute(prompt, low, progress=False)
        ok = half.attribute(prompt, TARGET, progress=False)  # a likelier target still runs in float16
    assert ok.target_prob >= FP16_MIN_PROB and ok.scores.abs().max() > 0
