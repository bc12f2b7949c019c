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
    assert "captum s" in capsys.readouterr().out


def test_bench_speed_rejects_bad_repeat(capsys):
    assert main(["bench", "speed", "--model", "tiny-gpt2", "--repeat", "0"]) == 2
