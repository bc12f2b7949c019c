import json

import pytest
import torch
from conftest import FACTS

from kn_plugin.attribution import AttributionResult
from kn_plugin.cli import main
from kn_plugin.locating import Neuron, activation_neurons, coarse_neurons, locate, refine, refine_adaptive


def _result(scores, acts=None):
    scores = torch.tensor(scores, dtype=torch.float32)
    return AttributionResult("m", "p", "t", scores, scores if acts is None else torch.tensor(acts),
                             0.5, torch.zeros(scores.shape[0]), tuple(range(scores.shape[0])), 20, "x")


def test_coarse_is_strictly_above_threshold_times_max():
    r = _result([[1.0, 0.2, 0.21], [-3.0, 0.5, 0.0]])
    assert [n.key for n in coarse_neurons(r, 0.2)] == [(0, 0), (1, 1), (0, 2)]
    assert [n.key for n in coarse_neurons(r, 1.0)] == []
    assert coarse_neurons(_result([[-1.0, -2.0]])) == []


def test_activation_baseline_uses_activations():
    r = _result([[1.0, 0.0]], acts=[[0.0, 1.0]])
    assert [n.key for n in activation_neurons(r)] == [(0, 1)]


def _sets(*keys_per_prompt):
    return [[Neuron(layer, i, 1.0) for layer, i in keys] for keys in keys_per_prompt]


def test_refine_keeps_neurons_shared_by_more_than_p():
    sets = _sets([(0, 1), (0, 2), (1, 1)], [(0, 1), (0, 2)], [(0, 1), (1, 1)], [(0, 1)])
    assert {n.key for n in refine(sets, 0.7)} == {(0, 1)}           # 4/4 > 2.8
    assert {n.key for n in refine(sets, 0.5)} == {(0, 1)}           # 2/4 is not > 2
    assert {n.key for n in refine(sets, 0.4)} == {(0, 1), (0, 2), (1, 1)}


def test_adaptive_share_moves_until_two_to_five():
    common = [(0, i) for i in range(8)]
    sets = _sets(common, common, common[:3], common[:3])
    kept, share = refine_adaptive(sets, 0.3)   # 8 neurons at 0.3 -> raise p
    assert 2 <= len(kept) <= 5 and share > 0.3
    kept, share = refine_adaptive(_sets([(0, 1)], [(0, 2)], [(0, 3)]), 0.7)
    assert share < 0.7 and len(kept) == 3  # too few: p goes down until 1 prompt is enough


def test_adaptive_never_overshoots_to_an_empty_set():
    shared = [(0, i) for i in range(9)]
    kept, share = refine_adaptive(_sets(shared, shared, shared), 0.7)
    assert len(kept) == 9  # p = 1 would keep nothing: the closest non-empty set stays


def test_locate_single_prompt_gives_coarse_set(tiny):
    prompt, target = FACTS[tiny.name]
    res = locate(tiny, prompt, target, progress=False)
    assert res.share is None
    assert res.neurons == res.coarse[0]
    with pytest.raises(ValueError, match="at least 3 prompts"):
        locate(tiny, [prompt], target, min_prompts=3, progress=False)


def test_cli_locate_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "n.json", tmp_path / "n.png"
    rc = main(["locate", "--model", "tiny-llama", "--prompt", "The capital of France is",
               "--prompt", "The capital city of France is", "--target", " Paris", "--quiet",
               "--json", str(out), "--plot", str(png)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["model"] == "tiny-llama" and data["target"] == " Paris"
    assert len(data["prompts"]) == 2 and len(data["target_prob"]) == 2
    assert all(set(n) == {"layer", "index", "score"} for n in data["neurons"])
    assert png.stat().st_size > 1000
    assert "knowledge neurons" in capsys.readouterr().out


def test_cli_demo_on_a_tiny_model(tmp_path, capsys):
    assert main(["demo", "--model", "tiny-llama", "--out", str(tmp_path), "--facts", "2", "--quiet"]) == 0
    data = json.loads((tmp_path / "demo.json").read_text())
    assert len(data["facts"]) == 2
    assert all(len(f["suppressed_prob"]) == len(f["prompts"]) for f in data["facts"])
    assert len(list(tmp_path.glob("*.png"))) == 2
    assert "when suppressed" in capsys.readouterr().out


def test_locate_quietly_takes_a_checked_config_or_keywords(tiny_models):
    from kn_plugin.errors import KnowledgeNeuronError
    from kn_plugin.locating import LocateConfig, locate, locate_quietly

    km = tiny_models["tiny-llama"]
    prompts = ["The capital of France is", "France's capital is"]
    config = LocateConfig(steps=4, progress=False)
    got = locate_quietly(km, prompts, " Paris", config=config)
    assert [n.key for n in got.neurons] == [n.key for n in locate(km, prompts, " Paris", steps=4, progress=False).neurons]
    with pytest.raises(KnowledgeNeuronError, match="not both"):
        locate_quietly(km, prompts, " Paris", config=config, steps=4)
    with pytest.raises(KnowledgeNeuronError, match="must be a LocateConfig"):
        locate_quietly(km, prompts, " Paris", config={"steps": 4})
