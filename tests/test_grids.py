"""Integration rules: every engine equals Captum's LayerIntegratedGradients with that rule."""

import pytest
import torch
from captum.attr import LayerIntegratedGradients
from conftest import FACTS

from kn_plugin import KnowledgeAttribution, captum_target, load_model, locate, wrap
from kn_plugin.attribution import CONVERGED, GRIDS, integration_grid, riemann_alphas, worst_relative_gap
from kn_plugin.cli import main
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.tiny import tiny_family

STEPS = 12
_CAPTUM = {}


def captum_reference(model, grid):
    key = (model.name, grid)
    if key not in _CAPTUM:
        prompt, target = FACTS[model.name]
        rows = []
        for layer in range(model.n_layers):
            t = captum_target(model, prompt, target, layer)
            rows.append(LayerIntegratedGradients(t.forward_func, t.layer).attribute(
                t.inputs, baselines=t.baselines, n_steps=STEPS, method=grid)[0].detach())
        _CAPTUM[key] = torch.stack(rows)
    return _CAPTUM[key]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("engine", ["fast", "stepper", "cached", "batched", "captum"])
def test_every_engine_equals_captum_for_every_rule(tiny, grid, engine):
    prompt, target = FACTS[tiny.name]
    res = KnowledgeAttribution(tiny, engine).attribute(prompt, target, steps=STEPS, grid=grid, batch_size=5,
                                                       progress=False)
    ref = captum_reference(tiny, grid)
    assert ref.abs().max() > 0 and res.extras["grid"] == grid
    # the cached engine is for causal LMs without a TransformerLens bridge (whose attention skips the cache;
    # other tests boot one on these shared models): elsewhere it falls back to the batched engine
    cached = "batched" if tiny.is_masked or "cached" in tiny.failed_paths else "cached"
    assert res.engine == {"fast": "stepper", "cached": cached}.get(engine, engine)
    assert (res.scores - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("grid", GRIDS)
def test_model_agnostic_engine_for_every_rule(grid):
    km = wrap(*tiny_family("gemma3"))
    res = KnowledgeAttribution(km, "cached").attribute("The capital of France is", " Paris", steps=STEPS,
                                                       grid=grid, progress=False)
    ref = KnowledgeAttribution(km, "batched").attribute("The capital of France is", " Paris", steps=STEPS,
                                                        grid=grid, progress=False)
    assert res.engine == "cached"
    assert (res.scores - ref.scores).abs().max() <= 1e-5 * ref.scores.abs().max()


def test_riemann_right_is_the_papers_formula(tiny):
    alphas, weights = integration_grid("riemann_right", 7)
    assert torch.equal(alphas, riemann_alphas(7)) and weights is None
    prompt, target = FACTS[tiny.name]
    default = KnowledgeAttribution(tiny).attribute(prompt, target, progress=False)
    explicit = KnowledgeAttribution(tiny).attribute(prompt, target, progress=False, grid="riemann_right")
    assert torch.equal(default.scores, explicit.scores)


def test_gauss_legendre_closes_the_completeness_gap(tiny_models):
    km = tiny_models["tiny-llama"]
    prompt, target = FACTS["tiny-llama"]
    right = KnowledgeAttribution(km).attribute(prompt, target, steps=10, progress=False)
    gl = KnowledgeAttribution(km).attribute(prompt, target, steps=10, grid="gausslegendre", progress=False)
    assert gl.completeness_gap.abs().max() < 0.1 * right.completeness_gap.abs().max()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_auto_steps_give_each_layer_the_smallest_m_it_needs(tiny_models, name):
    """Against brute force: plain calls at every m of the ladder, each layer kept at the first m
    whose completeness gap meets the tolerance; the auto rows equal those plain rows."""
    from kn_plugin.attribution import AUTO_STEPS, layer_effect_floor, relative_gaps

    km = tiny_models[name]
    prompt, target = FACTS[name]
    ka = KnowledgeAttribution(km)
    tol = 0.01
    res = ka.attribute(prompt, target, steps="auto", tolerance=tol, progress=False)
    plain = {m: ka.attribute(prompt, target, steps=m, progress=False) for m in AUTO_STEPS}
    floor = layer_effect_floor(plain[AUTO_STEPS[0]])
    expected = {}
    for m, r in plain.items():
        for layer, gap in relative_gaps(r, floor).items():
            if gap <= tol and layer not in expected:
                expected[layer] = m
    per = res.extras["steps_per_layer"]
    assert {layer: per[layer] for layer in range(km.n_layers)} == expected
    assert len(set(per)) > 1  # the layers do need different m here
    assert res.steps == max(per) and res.extras["auto_steps"][-1][0] == res.steps
    for layer, m in expected.items():
        scale = plain[m].scores[layer].abs().max()
        assert (res.scores[layer] - plain[m].scores[layer]).abs().max() <= 1e-5 * scale
        assert res.zeroed_prob[layer].item() == pytest.approx(plain[m].zeroed_prob[layer].item(), rel=1e-5)
    assert all(gap > tol for _, gap in res.extras["auto_steps"][:-1])
    # the first rung's gap is the plain worst gap; later rungs report only the layers still going
    assert res.extras["auto_steps"][0][1] == pytest.approx(worst_relative_gap(plain[AUTO_STEPS[0]]))


@pytest.mark.parametrize("engine", ["fast", "batched"])
def test_auto_steps_prepare_and_verify_once(tiny_models, monkeypatch, engine):
    """The clean pass, the engine's preparation, its reference and its self-check run on the first
    rung only; later rungs integrate the pending layers and give the plain call's rows."""
    import kn_plugin.attribution.core as core
    from kn_plugin.attribution.engines import base, stepper, verified

    km = tiny_models["tiny-llama"]
    prompt, target = FACTS["tiny-llama"]
    calls = {"clean": 0, "prepare": 0, "verify": 0, "zeroed": 0}

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(core, "_clean", counted("clean", core._clean))
    monkeypatch.setattr(stepper.StepperEngine, "prepare", counted("prepare", stepper.StepperEngine.prepare))
    monkeypatch.setattr(verified._SelfCheck, "compare", counted("verify", verified._SelfCheck.compare))
    monkeypatch.setattr(stepper.StepperEngine, "reference_zeroed",
                        counted("zeroed", stepper.StepperEngine.reference_zeroed))
    import kn_plugin.attribution.engines.batched as batched
    monkeypatch.setattr(batched, "zeroed_probs", counted("zeroed", base.zeroed_probs))
    res = KnowledgeAttribution(km, engine).attribute(prompt, target, steps="auto", tolerance=0.01, progress=False)
    assert len(res.extras["auto_steps"]) > 1  # several rungs ran
    assert calls["clean"] == 1 and calls["zeroed"] == 1
    assert (calls["prepare"], calls["verify"]) == ((1, 1) if engine == "fast" else (0, 0))
    per = res.extras["steps_per_layer"]
    for layer in range(km.n_layers):
        plain = KnowledgeAttribution(km, engine).attribute(prompt, target, steps=per[layer], layers=[layer],
                                                           progress=False)
        scale = plain.scores[layer].abs().max()
        assert (res.scores[layer] - plain.scores[layer]).abs().max() <= 1e-5 * scale


def test_auto_steps_cap_warns(tiny_models):
    km = tiny_models["tiny-llama"]
    prompt, target = FACTS["tiny-llama"]
    with pytest.warns(UserWarning, match="stopped at the cap m=10"):
        res = KnowledgeAttribution(km).attribute(prompt, target, steps="auto", tolerance=1e-12, max_steps=10,
                                                 progress=False)
    assert res.steps == 10


@pytest.mark.parametrize("kwargs,match", [
    ({"grid": "simpson"}, "unknown grid"), ({"steps": "auto", "tolerance": 0}, "tolerance"),
    ({"steps": "auto", "tolerance": float("nan")}, "finite"), ({"grid": "riemann_trapezoid", "steps": 1}, ">= 2"),
])
def test_bad_grid_input(tiny_models, kwargs, match):
    with pytest.raises(KnowledgeNeuronError, match=match):
        locate(tiny_models["tiny-llama"], "The capital of France is", " Paris", progress=False, **kwargs)


def test_cli_grid_and_auto_steps(capsys):
    assert main(["locate", "--model", "tiny-llama", "--prompt", "The capital of France is", "--target", " Paris",
                 "--grid", "gausslegendre", "--steps", "auto", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "grid: gausslegendre" in out and "steps auto for" in out and "largest completeness gap" in out
    assert main(["locate", "--model", "tiny-llama", "--prompt", "a b", "--target", " b", "--grid", "simpson"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_converged_preset_is_gauss_legendre_per_layer_auto(tiny_models, tmp_path, capsys):
    import json

    from kn_plugin.attribution import AUTO_TOLERANCE, CONVERGED, relative_gaps

    prompt, target = "The capital of France is", " Paris"
    out = tmp_path / "c.json"
    assert main(["locate", "--model", "tiny-llama", "--prompt", prompt, "--target", target, "--converged",
                 "--quiet", "--json", str(out)]) == 0
    att = json.loads(out.read_text())["attributions"][0]
    assert att["extras"]["grid"] == "gausslegendre" and len(att["extras"]["steps_per_layer"]) == 3
    res = locate(tiny_models["tiny-llama"], prompt, target, progress=False, **CONVERGED).attributions[0]
    assert att["extras"]["steps_per_layer"] == res.extras["steps_per_layer"] and att["steps"] == res.steps
    assert torch.allclose(torch.tensor(att["completeness_gap"]), res.completeness_gap.float(), atol=1e-7)
    floor = max((res.target_prob - res.zeroed_prob).abs().max().item() * 1e-3, 1e-12)
    assert max(relative_gaps(res, floor).values()) <= AUTO_TOLERANCE  # every layer converged
    capsys.readouterr()
    for extra in (["--steps", "50"], ["--grid", "riemann_left"]):
        assert main(["locate", "--model", "tiny-llama", "--prompt", prompt, "--target", target, "--converged",
                     "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("kn: error: --converged sets") and err.count("\n") == 1


def _grids_argv(out, grids: str, steps: str) -> list[str]:
    """``kn bench grids`` on tiny-llama and PARAREL's P36 (skips without PARAREL, outside CI)."""
    import os
    from pathlib import Path

    pararel = Path(os.environ.get("KN_PARAREL", Path(__file__).resolve().parents[2] / "shared" / "pararel"))
    if not (pararel / "patterns").is_dir() and not os.environ.get("CI"):
        pytest.skip(f"no PARAREL at {pararel}")
    return ["bench", "grids", "--model", "tiny-llama", "--pararel", str(pararel), "--relations", "P36",
            "--facts-per-relation", "2", "--grids", grids, "--grid-steps", steps, "--reference-steps", "16",
            "--prompts-per-fact", "2", "--max-rank", "400", "--out", str(out), "--quiet"]


def test_bench_grids_on_a_tiny_model(tmp_path, capsys):
    import json

    out = tmp_path / "grids"
    argv = _grids_argv(out, "riemann_right,gausslegendre", "2,4")
    pararel = argv[argv.index("--pararel") + 1]
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert [(r["grid"], r["steps"]) for r in data["summary"]] == [
        ("riemann_right", 2), ("riemann_right", 4), ("gausslegendre", 2), ("gausslegendre", 4)]
    counted = [r for r in data["records"] if r.get("rows")]
    assert counted
    for row in data["summary"]:
        assert 0 <= row["refined_jaccard"] <= 1 and row["worst_abs_gap"] >= row["median_abs_gap"] >= 0
    # the recorded errors are those of a plain call on the same prompt
    rec = counted[0]
    km = load_model("tiny-llama")
    first = rec["rows"][0]
    res = KnowledgeAttribution(km).attribute(rec["used_prompts"][0], rec["target"], steps=first["steps"],
                                             grid=first["grid"], progress=False)
    assert first["abs_gap"][0] == pytest.approx(res.completeness_gap.abs().max().item(), rel=1e-6)
    report = (out / "report.md").read_text()
    assert "Recommendation" in report and (out / "grids.png").stat().st_size > 1000
    mtime = (out / "facts").stat().st_mtime_ns
    assert main(argv) == 0  # resumes: every fact is already there
    assert (out / "facts").stat().st_mtime_ns == mtime
    one = ["bench", "grids", "--model", "tiny-llama", "--pararel", str(pararel), "--out", str(out)]
    assert main(one + ["--grids", "simpson"]) == 2
    assert main(one + ["--grid-steps", "1"]) == 2
    assert "kn: error:" in capsys.readouterr().err


def test_bench_grids_converged_row(tmp_path, capsys):
    import json

    argv = _grids_argv(tmp_path / "grids", "riemann_right", "2")
    assert main(argv) == 0
    assert main(argv + ["--converged"]) == 2  # another run: refused on the same folder
    assert "kn: error:" in capsys.readouterr().err
    conv = tmp_path / "conv"
    assert main(_grids_argv(conv, "riemann_right", "2") + ["--converged"]) == 0
    data = json.loads((conv / "results.json").read_text())
    assert [(r["grid"], r["steps"]) for r in data["summary"]] == [("riemann_right", 2), ("gausslegendre", "adaptive")]
    assert data["config"]["converged"] == CONVERGED  # the preset that ran, not just "true"
    rec = next(r for r in data["records"] if r.get("rows"))
    row = rec["rows"][-1]
    km = load_model("tiny-llama")
    plain = [KnowledgeAttribution(km).attribute(p, rec["target"], progress=False, **CONVERGED)
             for p in rec["used_prompts"]]
    assert row["layer_steps"] == [sum(m for m in r.extras["evaluations_per_layer"] if m) for r in plain]
    assert row["abs_gap"][0] == pytest.approx(plain[0].completeness_gap.abs().max().item(), rel=1e-6)
    assert "Converged preset: refined-set Jaccard" in (conv / "report.md").read_text()
