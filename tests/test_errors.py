import pytest

from kn_plugin.attribution import KnowledgeAttribution
from kn_plugin.cli import main
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.locating import locate
from kn_plugin.scoring import encode_fact


@pytest.mark.parametrize("prompt,target,match", [
    ("", " Paris", "prompt is empty"),
    ("   ", " Paris", "prompt is empty"),
    ("The capital of France is", "", "tokenizes to nothing"),
    ("The capital of France is", "   ", "tokenizes to nothing"),
    ("word " * 200, " Paris", "longer than the model's context"),
])
def test_bad_prompts_and_targets(tiny_models, prompt, target, match):
    with pytest.raises(KnowledgeNeuronError, match=match):
        encode_fact(tiny_models["tiny-llama"], prompt, target)


def test_masked_prompt_needs_a_mask(tiny_models):
    with pytest.raises(KnowledgeNeuronError, match="mask slot"):
        encode_fact(tiny_models["tiny-bert"], "The capital of France is", "paris")


@pytest.mark.parametrize("kw", [{"threshold": 0.0}, {"threshold": 1.5}, {"share": 0},
                                {"share": -0.1}, {"share": 2}])
def test_thresholds_outside_unit_interval(tiny_models, kw):
    with pytest.raises(KnowledgeNeuronError, match=r"in \(0, 1\]"):
        locate(tiny_models["tiny-llama"], ["The capital of France is"], " Paris", **kw)


def test_bad_engine_steps_and_layer(tiny_models):
    m = tiny_models["tiny-llama"]
    with pytest.raises(KnowledgeNeuronError, match="unknown engine"):
        KnowledgeAttribution(m, "magic")
    with pytest.raises(KnowledgeNeuronError, match="steps"):
        KnowledgeAttribution(m).attribute("The capital of France is", " Paris", steps=0)
    with pytest.raises(KnowledgeNeuronError, match="out of range"):
        KnowledgeAttribution(m).attribute("The capital of France is", " Paris", layers=[7])


@pytest.mark.parametrize("argv,match", [
    (["locate", "--model", "nope", "--prompt", "x", "--target", " y"], "unknown model"),
    (["locate", "--model", "tiny-llama", "--prompt", "", "--target", " y"], "prompt is empty"),
    (["locate", "--model", "tiny-llama", "--prompt", "a b", "--target", ""], "tokenizes to nothing"),
    (["locate", "--model", "tiny-bert", "--prompt", "no mask here", "--target", "paris"], "mask slot"),
    (["locate", "--model", "tiny-llama", "--prompt", "a " * 100, "--target", " b"], "context"),
    (["locate", "--model", "tiny-llama", "--prompt", "a b", "--target", " b", "--threshold", "0"],
     "threshold"),
    (["locate", "--model", "tiny-llama", "--prompt", "a b", "--target", " b", "--share", "1.2"],
     "share"),
])
def test_cli_errors_are_one_line(capsys, argv, match):
    assert main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kn: error:") and match in err
    assert "\n" not in err and "Traceback" not in err
