"""Many facts per call, Ray workers, killed workers and drivers."""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_pararel import ARGS, needs_pararel

from kn_plugin.cli import main
from kn_plugin.data import Fact
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.locating import LocateResult, keyed_facts, locate, locate_many

# CI installs the ray extra and must run these; elsewhere they need it installed
ray = importlib.import_module("ray") if os.environ.get("CI") else pytest.importorskip("ray")

FACTS = [
    Fact("France", "capital", " Paris", ("The capital of France is", "The capital city of France is"), "france"),
    Fact("Japan", "capital", " Tokyo", ("The capital of Japan is", "Japan's capital is")),
    Fact("Italy", "capital", " Rome", ("The capital of Italy is",)),
    Fact("Spain", "capital", " Madrid", ("The capital of Spain is", "Spain's capital city is")),
    Fact("France", "language", " French", ("The official language of France is", "People in France speak")),
    Fact("Germany", "capital", " Berlin", ("The capital of Germany is", "The German capital is")),
]


class one_thread:
    """Serial reference with the thread count of a Ray worker (--threads-per-worker 1):
    floating-point sums depend on how they are split across threads."""

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def _records(out: Path) -> dict:
    recs = {}
    for folder in ("facts", "effects", "unrelated", "updates", "erase"):
        for path in sorted((out / folder).glob("*.json")):
            rec = json.loads(path.read_text())
            rec.pop("seconds", None)
            recs[f"{folder}/{path.stem}"] = rec
    return recs


def session_pids(sid: int) -> list[int]:
    """Processes of the session ``sid`` (a process started with start_new_session=True and
    everything it spawned, the local Ray cluster included), by their ids."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
            if int(fields[3]) == sid and fields[0] != "Z":  # zombies are gone, waiting to be reaped
                pids.append(int(entry.name))
    return pids


def _no_stray_ray(sid: int) -> None:
    """Ray processes of a killed driver's cluster: those of the driver's own session, nothing else."""
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def serial_pararel(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    with one_thread():
        assert main(ARGS + ["--out", str(out)]) == 0
    return out, _records(out)


@needs_pararel
def test_killed_driver_resumes_on_two_workers_and_equals_serial(serial_pararel, tmp_path):
    ref_dir, expected = serial_pararel
    cmd = [sys.executable, "-m", "kn_plugin.cli", *ARGS, "--out", str(tmp_path), "--workers", "2"]
    # its own session: killing the group takes the driver and the local cluster it started
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(list((tmp_path / "facts").glob("*.json"))) >= 3:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait()
    finally:
        _no_stray_ray(proc.pid)
    done_at_kill = len(list((tmp_path / "facts").glob("*.json")))
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    n_facts = sum(k.startswith("facts/") for k in expected)
    assert 0 < done_at_kill < n_facts and not (tmp_path / "results.json").exists()

    rerun = subprocess.run(cmd, capture_output=True, text=True)  # resumed on two workers
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    got = _records(tmp_path)
    assert got.keys() == expected.keys()
    for key in expected:  # every fact exactly once, each as the serial run computed it: neurons,
        assert got[key] == expected[key], key  # probabilities, updates, erasures
    run = json.loads((tmp_path / "results.json").read_text())
    keys = [k for keys in run["relations"].values() for k in keys]
    assert len(keys) == len(set(keys)) == n_facts  # no fact lost or duplicated
    ref = json.loads((ref_dir / "results.json").read_text())
    assert run["records"] == ref["records"]
    summary = [json.loads((d / "summary.json").read_text()) for d in (tmp_path, ref_dir)]
    assert summary[0]["held_out"] == summary[1]["held_out"]
    md = tmp_path / "compare.md"  # two identical runs, side by side: no finding is "mixed"
    assert main(["bench", "compare", str(ref_dir), str(tmp_path), "--report", str(md)]) == 0
    assert "suppressing knowledge neurons" in md.read_text() and "mixed" not in md.read_text()


def test_killed_worker_is_replaced_and_its_fact_retried(tiny_models, tmp_path):
    from kn_plugin.distributed import PoolConfig, RayPool

    model = tiny_models["tiny-llama"]
    with one_thread():
        expected = dict(locate_many(model, FACTS, progress=False))
    seen, killed = [], None
    with RayPool(model, PoolConfig(workers=2)) as pool:
        for key, res in locate_many(model, FACTS, out=tmp_path, pool=pool, progress=False):
            if killed is None:  # one fact done, others in flight: kill a worker process
                killed = pool.pids()[0]
                os.kill(killed, signal.SIGKILL)
            seen.append((key, res))
        assert killed not in pool.pids()
    keys = [k for k, _ in seen]
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys))
    assert sorted(p.stem for p in tmp_path.glob("*.json")) == sorted(expected)
    for key, res in seen:
        assert res.neurons == expected[key].neurons and res.target_prob == expected[key].target_prob, key
        assert LocateResult.load(tmp_path / f"{key}.json").neurons == res.neurons


def test_locate_many_equals_single_calls_and_resumes(tiny_models, tmp_path, monkeypatch):
    model = tiny_models["tiny-gpt2"]
    got = list(locate_many(model, FACTS[:3], out=tmp_path, progress=False, steps=10))
    keys = [k for k, _ in keyed_facts(FACTS[:3])]
    assert [k for k, _ in got] == keys and keys[0] == "france"  # input order, the fact's own key
    for (_, res), fact in zip(got, FACTS):
        single = locate(model, list(fact.prompts), fact.target, steps=10, progress=False)
        assert res.neurons == single.neurons
        assert torch.equal(res.attributions[0].scores, single.attributions[0].scores)
    # a rerun loads every finished fact instead of computing it
    import kn_plugin.locating.many as many

    monkeypatch.setattr(many, "locate_with", lambda *a, **k: pytest.fail("recomputed a finished fact"))
    again = list(locate_many(model, FACTS[:3], out=tmp_path, progress=False, steps=10))
    assert [(k, r.neurons) for k, r in again] == [(k, r.neurons) for k, r in got]
    with pytest.raises(KnowledgeNeuronError, match=r"other settings \(steps\)"):  # not mixed with other settings
        locate_many(model, FACTS[:3], out=tmp_path, progress=False, steps=5)


def test_locate_facts_cli(tiny_models, tmp_path, capsys):
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"prompts": list(f.prompts), "target": f.target}) + "\n" for f in FACTS[:2]))
    out = tmp_path / "out"
    assert main(["locate", "--model", "tiny-llama", "--facts", str(facts), "--out", str(out), "--quiet",
                 "--steps", "5"]) == 0
    results = sorted(out.glob("*.json"))
    assert len(results) == 2
    for path, fact in zip(results, FACTS):
        res = LocateResult.load(path)
        assert res.target == fact.target and res.prompts == list(fact.prompts)
        assert res.attributions[0].steps == 5


def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"prompts": ["The capital of France is"], "target": " Paris"}) + "\n")
    base = ["locate", "--model", "tiny-llama", "--facts", str(facts), "--out", str(tmp_path / "o")]

    def error(argv, match):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("kn: error:") and len(err.splitlines()) == 1 and match in err, err

    error(base + ["--workers", "0"], "must be >= 1")
    error(base + ["--ray-address", "127.0.0.1:1"], "cannot reach a Ray cluster at 127.0.0.1:1")
    error(base + ["--ray-address", "nonsense"], "is not HOST:PORT")
    error(["locate", "--model", "tiny-llama", "--facts", str(facts)], "--facts needs --out")
    error(["locate", "--model", "tiny-llama", "--prompt", "x", "--target", " y", "--workers", "2"], "use them with --facts")
    error(["locate", "--model", "tiny-llama"], "give --prompt")
    dup = tmp_path / "dup.jsonl"
    dup.write_text((json.dumps({"prompt": "a b", "target": " c", "key": "k"}) + "\n") * 2)
    error(["locate", "--model", "tiny-llama", "--facts", str(dup), "--out", str(tmp_path / "d")], "appears twice")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    error(base + ["--workers", "2"], 'pip install "kn_plugin[ray]"')
    error(["bench", "pararel", "--model", "tiny-llama", "--workers", "2", "--out", str(tmp_path / "b")],
          'pip install "kn_plugin[ray]"')
    with pytest.raises(KnowledgeNeuronError, match="unknown locate options"):
        locate_many("tiny-llama", FACTS, stepz=3)


def _ray_start(args: list[str], env: dict) -> subprocess.Popen:
    """A Ray node in the foreground (--block), in its own session: stopped by its session id."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    return subprocess.Popen([ray_bin, "start", *args, "--block", "--disable-usage-stats"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_for(check, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@needs_pararel
def test_live_cluster_equals_serial_and_survives_a_lost_node(serial_pararel, tmp_path):
    """A head (no CPUs) and a second node started with `ray start` on this machine (a fresh HOME
    so that the cluster's token is the one the driver reads); `kn bench pararel --ray-address`
    against it equals the serial run although the second node, where the workers run, is
    killed mid-run and a third node joins."""
    import socket

    from kn_plugin.distributed import check_address
    from kn_plugin.models import cache_dir

    _, expected = serial_pararel
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import tempfile

    short = Path(tempfile.mkdtemp(prefix="kr", dir="/tmp"))  # Ray's socket paths must stay short
    home = short / "home"
    home.mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},  # e.g. an earlier ray.init's address
           "HOME": str(home), "KN_PLUGIN_CACHE": str(cache_dir()), "RAY_USAGE_STATS_ENABLED": "0"}
    address = f"127.0.0.1:{port}"
    nodes = []
    try:
        nodes.append(_ray_start(["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "0",
                                 "--include-dashboard=false", "--temp-dir", str(short / "ray")], env))

        def up():
            try:
                return check_address(address, timeout=5) == address
            except KnowledgeNeuronError:
                return False

        _wait_for(up, 180, "the head node")
        nodes.append(_ray_start(["--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", "2"], env))
        time.sleep(3)
        cmd = [sys.executable, "-m", "kn_plugin.cli", *ARGS, "--workers", "2", "--ray-address", address]
        # the second node dies mid-run: its workers' facts go to replacements, nothing is lost
        out = tmp_path / "b"
        proc = subprocess.Popen(cmd + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        _wait_for(lambda: len(list((out / "facts").glob("*.json"))) >= 3 or proc.poll() is not None, 300, "3 facts")
        for pid in session_pids(nodes[1].pid):  # the only node with CPUs: both workers were there
            os.kill(pid, signal.SIGKILL)
        nodes.append(_ray_start(["--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", "2"], env))
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        assert "died" in err  # the workers were lost and replaced on the new node
        assert _records(out) == expected
    finally:
        for node in nodes:
            for pid in session_pids(node.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for node in nodes:
            node.wait(timeout=30)
        shutil.rmtree(short, ignore_errors=True)
    time.sleep(1)
    assert not any(session_pids(n.pid) for n in nodes)
