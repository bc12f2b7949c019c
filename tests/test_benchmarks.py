import json

from kn_plugin.cli import main


def test_bench_speed_reports_both_paths(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["bench", "speed", "--model", "tiny-gpt2", "--json", str(out), "--repeat", "2"]) == 0
    data = json.loads(out.read_text())
    assert data["model"] == "tiny-gpt2" and data["steps"] == 20 and data["repeat"] == 2
    assert len(data["prompts"]) == 2
    short, long = data["prompts"]
    assert short["tokens"] < long["tokens"]
    for row in data["prompts"]:
        assert {"tokens", "captum_s", "fast_s", "ratio", "max_rel_diff"} <= set(row)
        assert row["captum_s"] > 0 and row["fast_s"] > 0
        assert abs(row["ratio"] - row["captum_s"] / row["fast_s"]) <= 0.005 + 1e-9
        assert row["max_rel_diff"] < 1e-4
        assert row["fast_engine"] == "stepper"
        assert row["cached_s"] > 0 and row["cached_max_rel_diff"] < 1e-4
        assert abs(row["cached_ratio"] - row["captum_s"] / row["cached_s"]) <= 0.005 + 1e-9
    out = capsys.readouterr().out
    assert "captum s" in out and "fast:stepper" in out and "cached" in out


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
