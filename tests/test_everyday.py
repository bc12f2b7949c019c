"""Everyday use: every bad input is one line (error or warning) or documented behaviour, the
defaults answer, and results and edited models can be saved and reloaded."""

import json
import math
import shutil
import sys

import pytest
import torch
from conftest import FACTS

from kn_plugin import KnowledgeAttribution, LocateResult, encode_fact, load_model, locate, suppress
from kn_plugin.cli import build_parser, main
from kn_plugin.editing import WeightEdit, unchanged_since, update_fact, weight_snapshot
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.evaluation import target_probs
from kn_plugin.interventions import amplify
from kn_plugin.locating import read_neurons_file

PARIS = ["The capital of France is", "The capital city of France is", "France's capital city is"]


def one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kn: error:") and match in err, err
    assert "\n" not in err and "Traceback" not in err


@pytest.fixture
def neurons_file(tmp_path, tiny_models):
    path = tmp_path / "n.json"
    locate(tiny_models["tiny-llama"], PARIS, " Paris", steps=4, progress=False).save(path)
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a command loads a model (checks must come first)."""
    from kn_plugin import models

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    for module in [m for name, m in sys.modules.items() if name.startswith("kn_plugin")]:
        if getattr(module, "load_model", None) is models.load_model:  # every module that bound it
            monkeypatch.setattr(module, "load_model", refuse)


# --- files and folders -------------------------------------------------------------------------

def test_non_utf8_neurons_and_facts_files(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    one_line_error(capsys, ["suppress", "--model", "tiny-llama", "--neurons", str(bad), "--prompt", "a b",
                            "--target", " b"], "not UTF-8")
    one_line_error(capsys, ["edit", "erase", "--model", "tiny-llama", "--facts", str(bad)], "not UTF-8")


@pytest.mark.parametrize("damage,match", [
    ("config", "cannot read"), ("model_type", "cannot read"), ("weights", "holds no weights"),
    ("tokenizer", "holds no tokenizer files"),
])
def test_broken_model_folders(tmp_path, tiny_models, capsys, damage, match):
    folder = tmp_path / "m"
    shutil.copytree(tiny_models["tiny-llama"].path, folder)
    if damage == "config":
        (folder / "config.json").write_text("{not json")
    elif damage == "model_type":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["model_type"] = "no-such-family"
        (folder / "config.json").write_text(json.dumps(cfg))
    elif damage == "weights":
        for f in folder.glob("*.safetensors"):
            f.unlink()
    else:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (folder / f).unlink(missing_ok=True)
    one_line_error(capsys, ["locate", "--model", str(folder), "--prompt", "a b", "--target", " b"], match)


def test_output_paths_are_checked_before_the_model_loads(tmp_path, capsys, no_model_load, neurons_file):
    a_file = tmp_path / "file"
    a_file.write_text("")
    base = ["locate", "--model", "tiny-llama", "--prompt", "a b", "--target", " b"]
    one_line_error(capsys, base + ["--json", str(a_file / "out.json")], "not a writable folder")
    one_line_error(capsys, base + ["--plot", str(tmp_path / "out.xyz")], "--plot")
    one_line_error(capsys, base + ["--json", str(tmp_path)], "is a folder")
    one_line_error(capsys, ["edit", "update", "--model", "tiny-llama", "--neurons", str(neurons_file),
                            "--prompt", "a b", "--old", " b", "--new", " c", "--save", str(tmp_path)],
                   "is a folder")


def test_save_into_a_missing_folder_creates_it(tmp_path, tiny_models):
    res = locate(tiny_models["tiny-llama"], PARIS[0], " Paris", steps=2, progress=False)
    path = res.save(tmp_path / "new" / "deeper" / "r.json")
    assert path.exists() and (tmp_path / "new" / "deeper" / "r.json.npz").exists()


def test_edit_load_of_a_foreign_file(tmp_path):
    bad = tmp_path / "e.pt"
    bad.write_text("this is not a torch file")
    with pytest.raises(KnowledgeNeuronError, match="not a kn_plugin edit file"):
        WeightEdit.load(bad)
    with pytest.raises(KnowledgeNeuronError, match="no such file"):
        WeightEdit.load(tmp_path / "missing.pt")


# --- numbers, indices, options -----------------------------------------------------------------

@pytest.mark.parametrize("bad", [(0, 1.7), (True, 1), (0, "3"), (0, None), ("a", 2), {"layer": 0}])
def test_neuron_indices_must_be_integers(tiny_models, bad):
    with pytest.raises(KnowledgeNeuronError, match="integer|pair"):
        with suppress(tiny_models["tiny-llama"], [bad]):
            pass


def test_tl_hook_functions_check_their_input():
    from kn_plugin import scale_hook, set_hook, suppress_hook

    for bad in ([1.7], [True], ["3"], torch.tensor([1.5])):
        with pytest.raises(KnowledgeNeuronError, match="integer"):
            suppress_hook(bad)
    with pytest.raises(KnowledgeNeuronError, match="finite"):
        scale_hook([1], math.nan)
    with pytest.raises(KnowledgeNeuronError, match="finite"):
        set_hook([1], math.inf)
    act = torch.ones(1, 3, 4)
    assert suppress_hook(torch.tensor([1, 2]))(act)[0, -1].tolist() == [1, 0, 0, 1]


def test_neurons_file_with_float_index(tmp_path, tiny_models, neurons_file):
    data = json.loads(neurons_file.read_text())
    data["neurons"][0]["index"] = 1.7
    neurons_file.write_text(json.dumps(data))
    with pytest.raises(KnowledgeNeuronError, match="integer"):
        read_neurons_file(neurons_file, tiny_models["tiny-llama"])


@pytest.mark.parametrize("option,value", [("--lambda2", "nan"), ("--lambda1", "inf"), ("--lambda2", "x")])
def test_nan_and_inf_options_are_refused(capsys, neurons_file, option, value):
    one_line_error(capsys, ["edit", "update", "--model", "tiny-llama", "--neurons", str(neurons_file),
                            "--prompt", "a b", "--old", " b", "--new", " c", option, value], option)


def test_amplify_factor_nan_and_suppress_factor(capsys, neurons_file, tiny_models):
    base = ["--model", "tiny-llama", "--neurons", str(neurons_file), "--prompt", "a b", "--target", " b"]
    one_line_error(capsys, ["amplify", *base, "--factor", "nan"], "--factor")
    one_line_error(capsys, ["suppress", *base, "--factor", "3"], "unrecognized arguments: --factor")
    with pytest.raises(KnowledgeNeuronError, match="finite"):
        with amplify(tiny_models["tiny-llama"], [(0, 1)], factor=math.nan):
            pass
    with pytest.raises(KnowledgeNeuronError, match="finite"):
        update_fact(tiny_models["tiny-llama"], [(0, 1)], " Paris", " Rome", lambda2=math.nan)


def test_every_option_has_help():
    def walk(parser):
        for action in parser._actions:
            if action.choices and isinstance(action.choices, dict):
                for sub in action.choices.values():
                    yield from walk(sub)
            elif action.option_strings and action.dest not in ("help", "version"):
                yield parser.prog, action
    missing = [f"{prog} {a.option_strings[0]}" for prog, a in walk(build_parser()) if not a.help]
    assert not missing


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("kn_plugin ")


def test_usage_errors_are_one_line(capsys):
    one_line_error(capsys, ["locate", "--model", "tiny-llama"], "give --prompt")
    one_line_error(capsys, ["nonsense"], "invalid choice")


# --- identity, warnings, safe defaults ---------------------------------------------------------

def test_neurons_file_identity_is_the_fingerprint_not_the_name(capsys, neurons_file, tiny_models, tmp_path):
    folder_model = load_model(tiny_models["tiny-llama"].path)  # same weights, another display name
    assert folder_model.name != "tiny-llama"
    neurons, _ = read_neurons_file(neurons_file, folder_model)
    assert neurons
    with pytest.raises(KnowledgeNeuronError, match="was made for"):
        read_neurons_file(neurons_file, tiny_models["tiny-gpt2"])
    data = json.loads(neurons_file.read_text())
    del data["fingerprint"]
    anonymous = tmp_path / "anon.json"
    anonymous.write_text(json.dumps(data))
    one_line_error(capsys, ["suppress", "--model", "tiny-llama", "--neurons", str(anonymous), "--prompt",
                            "a b", "--target", " b"], "does not say which model")


def test_warnings_for_suspicious_targets(tiny_models):
    llama, bert = tiny_models["tiny-llama"], tiny_models["tiny-bert"]
    with pytest.warns(UserWarning, match="no leading space"):
        encode_fact(llama, "The capital of France is", "Paris")
    with pytest.warns(UserWarning, match="maps to"):
        encode_fact(bert, "The capital of France is [MASK] .", "€")
    res = KnowledgeAttribution(llama).attribute("The capital of France is", " Paris", steps=2, progress=False)
    low = [t for t in (" Paris", " Rome", " Berlin", " Tokyo", " French", " oxygen")
           if KnowledgeAttribution(llama).attribute("The capital of France is", t, steps=1, layers=[],
                                                    progress=False).target_prob < 1e-3]
    assert low, res.target_prob
    with pytest.warns(UserWarning, match="does not predict this fact"):
        locate(llama, "The capital of France is", low[0], steps=2, progress=False)


def test_masked_models_need_the_fact_position(tiny_models):
    bert = tiny_models["tiny-bert"]
    fact = encode_fact(bert, *FACTS["tiny-bert"])
    with pytest.raises(KnowledgeNeuronError, match="masked LM"):
        with suppress(bert, [(0, 1)]):
            pass
    with suppress(bert, [(0, 1)], position=fact):  # the mask slot
        target_probs(bert, [fact])


def test_edits_stack_and_unwind_in_any_order(tiny_models):
    model = tiny_models["tiny-llama"]
    snapshot = weight_snapshot(model)
    a = update_fact(model, [(0, 1), (1, 2)], " Paris", " Rome")
    b = update_fact(model, [(1, 2), (2, 3)], " Paris", " Berlin", lambda2=3.0)
    for order in ([0, 1], [1, 0]):
        h1 = a.apply(model)
        h2 = a.apply(model)  # the same edit twice
        h3 = b.apply(model)
        handles = [h1, h2, h3]
        assert torch.equal(model.adapter.value_slots(2)[3], b.new[1])
        for i in order + [2]:
            handles[i].revert()
        assert unchanged_since(snapshot)


# --- defaults that answer ----------------------------------------------------------------------

def test_several_prompts_use_adaptive_refinement_by_default(tiny_models):
    model = tiny_models["tiny-llama"]
    res = locate(model, PARIS, " Paris", steps=4, progress=False)
    assert res.adaptive
    fixed = locate(model, PARIS, " Paris", steps=4, share=0.7, progress=False)
    assert not fixed.adaptive and fixed.share == 0.7
    assert (res.note is None) == (2 <= len(res.neurons) <= 5)
    if not fixed.neurons:
        assert "lower --share" in fixed.note


def test_cli_locate_says_why_a_fixed_share_is_empty(capsys, monkeypatch):
    from kn_plugin.locating import core as refinement

    monkeypatch.setattr(refinement, "refine", lambda coarse, share: [])
    assert main(["locate", "--model", "tiny-llama", "--prompt", PARIS[0], "--prompt", PARIS[1], "--target",
                 " Paris", "--share", "0.7", "--steps", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "lower --share" in notes[0]


# --- results you can keep ----------------------------------------------------------------------

def test_locate_result_reloads_bit_identically(tmp_path, tiny):
    prompt, target = FACTS[tiny.name]
    res = locate(tiny, [prompt, prompt.replace("capital", "capital city")], target, steps=4, progress=False)
    res.save(tmp_path / "r.json")
    back = LocateResult.load(tmp_path / "r.json")
    assert back.neurons == res.neurons and [n.score for n in back.neurons] == [n.score for n in res.neurons]
    assert back.coarse == res.coarse and back.share == res.share and back.fingerprint == res.fingerprint
    for a, b in zip(res.attributions, back.attributions):
        assert torch.equal(a.scores, b.scores) and torch.equal(a.activations, b.activations)
        assert torch.equal(a.zeroed_prob, b.zeroed_prob) and a.target_prob == b.target_prob
        assert a.engine == b.engine and a.layers == b.layers and a.extras == b.extras


def test_kn_plot_redraws_a_saved_result(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["locate", "--model", "tiny-llama", "--prompt", PARIS[0], "--target", " Paris", "--steps", "2",
                 "--quiet", "--json", str(out)]) == 0
    assert main(["plot", str(out), "--out", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").stat().st_size > 1000
    capsys.readouterr()  # the output of the commands above
    one_line_error(capsys, ["plot", str(tmp_path / "missing.json")], "cannot read")


def test_kn_edit_apply_writes_a_loadable_edited_model(tmp_path, tiny_models, neurons_file, capsys):
    from transformers import AutoModelForCausalLM

    edit_file, folder = tmp_path / "e.pt", tmp_path / "edited"
    assert main(["edit", "update", "--model", "tiny-llama", "--neurons", str(neurons_file), "--prompt", PARIS[0],
                 "--old", " Paris", "--new", " Rome", "--save", str(edit_file), "--json",
                 str(tmp_path / "u.json")]) == 0
    report = json.loads((tmp_path / "u.json").read_text())
    assert report["sign_aware"] is True and len(report["new_is_top"]) == 1
    assert main(["edit", "apply", "--model", "tiny-llama", "--edit", str(edit_file), "--out", str(folder)]) == 0
    model = tiny_models["tiny-llama"]
    fact = encode_fact(model, PARIS[0], " Rome")
    with WeightEdit.load(edit_file).applied(model):
        expected = target_probs(model, [fact])[0]
    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        logits = hf(fact.input_ids).logits
    got = torch.softmax(logits[0, fact.pred_pos], -1)[fact.target_ids[0]].item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert target_probs(load_model(folder), [fact])[0] == pytest.approx(expected, rel=1e-5)
    capsys.readouterr()  # the output of the commands above
    one_line_error(capsys, ["edit", "apply", "--model", "tiny-gpt2", "--edit", str(edit_file), "--out",
                            str(tmp_path / "other")], "was made for")
    assert not (tmp_path / "other").exists() and not list(tmp_path.glob(".other.kn-*"))
    # never over an existing folder, nor into the folder the model came from, nor over an input
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "weights.bin").write_text("someone's")
    one_line_error(capsys, ["edit", "apply", "--model", "tiny-llama", "--edit", str(edit_file), "--out", str(theirs)],
                   "exists and is not empty")
    one_line_error(capsys, ["edit", "apply", "--model", "tiny-llama", "--edit", str(edit_file), "--out", str(theirs),
                            "--force"], "was not written by `kn edit apply`")
    assert (theirs / "weights.bin").read_text() == "someone's"
    one_line_error(capsys, ["edit", "apply", "--model", str(folder), "--edit", str(edit_file), "--out",
                            str(folder)], "never writes into the folder a model is loaded from")
    one_line_error(capsys, ["edit", "apply", "--model", "tiny-llama", "--edit", str(edit_file), "--out", str(folder)],
                   "exists and is not empty")
    before = (folder / "kn_plugin_edit.json").read_text()
    assert main(["edit", "apply", "--model", "tiny-llama", "--edit", str(edit_file), "--out", str(folder),
                 "--force"]) == 0  # a folder kn wrote may be replaced on request
    assert (folder / "kn_plugin_edit.json").read_text() == before and not list(tmp_path.glob(".edited.kn-*"))
    capsys.readouterr()
    saved = neurons_file.read_bytes()
    for flag, value in (("--json", neurons_file), ("--save", neurons_file)):
        argv = ["edit", "update", "--model", "tiny-llama", "--neurons", str(neurons_file), "--prompt", PARIS[0],
                "--old", " Paris", "--new", " Rome", flag, str(value)]
        one_line_error(capsys, argv, "never writes over its inputs")
    assert neurons_file.read_bytes() == saved
