import json

from kn_plugin.cli import main


def _cpuinfo_model_name():
    import platform

    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def test_bench_speed_reports_both_paths(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["bench", "speed", "--model", "tiny-gpt2", "--json", str(out), "--repeat", "2"]) == 0
    data = json.loads(out.read_text())
    assert data["model"] == "tiny-gpt2" and data["steps"] == 20 and data["repeat"] == 2
    assert data["cpu"] == _cpuinfo_model_name()  # timings are comparable on the same processor only
    assert len(data["prompts"]) == 2
    short, long = data["prompts"]
    assert short["tokens"] < long["tokens"]
    for row in data["prompts"]:
        assert {"tokens", "captum_s", "fast_s", "ratio", "max_rel_diff"} <= set(row)
        assert row["captum_s"] > 0 and row["fast_s"] > 0
        assert abs(row["ratio"] - row["captum_s"] / row["fast_s"]) <= 0.005 + 1e-9
        assert len(row["paired_ratios"]) == 2 and all(x > 0 for x in row["paired_ratios"])  # one per round
        assert row["max_rel_diff"] < 1e-4
        assert row["fast_engine"] == "stepper"
        assert row["cached_s"] > 0 and row["cached_max_rel_diff"] < 1e-4
        assert abs(row["cached_ratio"] - row["captum_s"] / row["cached_s"]) <= 0.005 + 1e-9
        for engine in ("captum", "fast", "cached"):  # the work, its rate and its distance from the limit
            assert row[f"{engine}_gflop"] > 0 and row["peak_gflops"] > 0
            assert abs(row[f"{engine}_gflops"] - row[f"{engine}_gflop"] / row[f"{engine}_s"]) <= 0.01
            # the rate is rounded to 0.01 GFLOP/s: that is all the two may differ by
            assert abs(row[f"{engine}_of_peak"] - row[f"{engine}_gflops"] / row["peak_gflops"]) <= (
                0.005 / row["peak_gflops"] + 1e-3)
        assert row["captum_gflop"] > row["fast_gflop"]  # Captum runs every layer's path from the embeddings
        ops = row["fast_profile"]  # where the time goes, by operator
        assert ops[-1]["op"] == "other" and len(ops) == 9 and abs(sum(o["share"] for o in ops) - 1) < 1e-3
        assert all(a["self_s"] >= b["self_s"] for a, b in zip(ops, ops[1:-1]))
        assert any(o["op"] in ("aten::mm", "aten::addmm", "aten::bmm") for o in ops)
        assert row["converged_profile"] == [] and "converged_gflops" not in row  # only with --converged
        phases = row["fast_phases"]  # the same profiled run, by phase of the attribution
        assert {"clean", "reference", "prepare", "integrate"} <= set(phases)
        assert all(s > 0 for s in phases.values()) and "refine" not in phases
        assert "verify" not in phases  # in float32 the self-check rides in the integration's first pass
    assert long["fast_gflop"] > short["fast_gflop"]
    out = capsys.readouterr().out
    assert "captum s" in out and "fast:stepper" in out and "cached" in out and "matmul peak" in out
    assert "captum / fast in each round" in out


def test_bench_speed_converged_preset_beside_the_paper(tmp_path, capsys):
    from kn_plugin.attribution import AUTO_MAX_STEPS, CONVERGED
    from kn_plugin.attribution.adaptive import ADAPTIVE_POINTS

    out = tmp_path / "speed.json"
    assert main(["bench", "speed", "--model", "tiny-llama", "--json", str(out), "--converged",
                 "--prompt", "The capital of France is"]) == 0
    (row,) = json.loads(out.read_text())["prompts"]
    assert row["converged_s"] > 0 and row["reference_s"] > 0
    assert row["converged_gflop"] > 0  # its work and rate, as for the other paths
    assert abs(row["converged_gflops"] - row["converged_gflop"] / row["converged_s"]) <= 0.01
    assert row["converged_worst_gap"] <= 0.01  # every layer within the tolerance
    assert 3 * ADAPTIVE_POINTS <= row["converged_layer_steps"] <= 3 * AUTO_MAX_STEPS
    assert 0 <= row["paper_jaccard"] <= 1 and 0 <= row["converged_jaccard"] <= 1
    assert row["converged_profile"] and row["converged_profile"][0]["share"] > 0
    assert row["converged_phases"]["integrate"] > 0
    out = capsys.readouterr().out
    assert f"converged ({CONVERGED['grid']}, {CONVERGED['steps']} per layer)" in out
    assert "converged, self CPU time by operator" in out and "converged, seconds by phase" in out


def test_flop_count_is_the_hand_count_of_a_forward(tiny_models):
    """The counter counts 2 x m x k x n per product: a plain forward of tiny-llama equals the
    sum over its linear layers and attention products counted by hand."""
    import torch

    from kn_plugin.bench.speed import count_gflop
    from kn_plugin.hardware import matmul_gflops

    model = tiny_models["tiny-llama"]
    hf, cfg = model.hf_model, model.hf_model.config
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    t = ids.shape[1]
    linear = sum(2 * t * m.in_features * m.out_features for m in hf.modules() if isinstance(m, torch.nn.Linear))
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    attention = cfg.num_hidden_layers * 2 * (2 * t * t * head_dim * cfg.num_attention_heads)
    with torch.no_grad():
        counted = count_gflop(lambda: hf(ids))
    assert counted * 1e9 == linear + attention
    assert matmul_gflops(64, 32, 48, torch.float32, "cpu", seconds=0.05) > 0


def test_device_and_dtype_options_on_every_model_command(capsys):
    from kn_plugin.cli import build_parser

    parser = build_parser()
    commands = [["locate"], ["demo"], ["suppress"], ["amplify"], ["edit", "update"], ["edit", "erase"],
                ["bench", "speed"], ["bench", "pararel"]]
    for cmd in commands:
        sub = parser
        for word in cmd:
            sub = next(a for a in sub._actions if a.dest in ("command", "edit", "bench")).choices[word]
        options = {o for a in sub._actions for o in a.option_strings}
        assert {"--model", "--device", "--dtype"} <= options, cmd
    assert main(["locate", "--model", "tiny-llama", "--prompt", "a b", "--target", " b",
                 "--device", "nonsense:device"]) == 2
    assert "unknown device" in capsys.readouterr().err


def test_bench_speed_rejects_bad_repeat(capsys):
    assert main(["bench", "speed", "--model", "tiny-gpt2", "--repeat", "0"]) == 2


def test_low_precision_on_a_cpu_without_its_matrix_units_warns(monkeypatch):
    import warnings

    import pytest
    import torch

    from kn_plugin import hardware
    from kn_plugin.hardware import SlowPrecisionWarning, warn_if_slow_precision

    state = torch.get_rng_state()
    measured = hardware.low_precision_speedup(torch.bfloat16, "cpu")
    assert measured > 0
    assert torch.equal(torch.get_rng_state(), state)  # the measurement leaves the caller's random state
    # the same rates measured directly: slower than float32 here exactly when the check says so
    direct = hardware.matmul_gflops(256, 512, 512, torch.bfloat16, seconds=0.2) / hardware.matmul_gflops(
        256, 512, 512, torch.float32, seconds=0.2)
    if all(r < 0.5 or r > 2 for r in (measured, direct)):  # both far from 1 (a busy machine blurs them): same side
        assert (direct < 1) == (measured < 1)
    for ratio, warns in ((0.01, True), (3.0, False)):
        monkeypatch.setattr(hardware, "low_precision_speedup", lambda dtype, device_type, r=ratio: r)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            warn_if_slow_precision(torch.bfloat16, torch.device("cpu"))
        assert [w.category for w in seen] == ([SlowPrecisionWarning] if warns else [])

    def never(*a):
        raise AssertionError("float32 and GPUs are not measured")

    monkeypatch.setattr(hardware, "low_precision_speedup", never)
    warn_if_slow_precision(torch.float32, torch.device("cpu"))
    with pytest.raises(AssertionError):
        warn_if_slow_precision(torch.float16, torch.device("cpu"))
