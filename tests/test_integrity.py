"""Result folders that never mix, files that never get deleted or half-written."""

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

from kn_plugin.data import Fact
from kn_plugin.editing import WeightEdit, read_slots
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.files import clear_own_temps, temp_path
from kn_plugin.locating import LocateResult, locate, locate_many
from kn_plugin.models import load_model

FACTS = [Fact("France", "capital", " Paris", ("The capital of France is", "France's capital is"), "france"),
         Fact("Japan", "capital", " Tokyo", ("The capital of Japan is",), "japan")]


def _edit(model, scale=0.5):
    slots = [(0, 1), (1, 2)]
    old = read_slots(model, slots)
    return WeightEdit(model.name, model.n_layers, model.d_mlp, slots, old, old * scale, "update", {}, model.fingerprint)


def test_weights_digest_sees_edits_and_dtype_the_fingerprint_does_not(tiny_models):
    model = tiny_models["tiny-llama"]
    base = model.identity()
    with _edit(model).applied(model):
        edited = model.identity()
    assert edited["model"] == base["model"]  # edits and neuron files still apply to the same model
    assert edited["weights"] != base["weights"]
    assert model.identity() == base  # undone exactly
    half = load_model("tiny-llama", dtype="bfloat16")
    assert half.fingerprint == model.fingerprint and half.identity()["weights"] != base["weights"]
    assert half.identity()["dtype"] == "bfloat16"


def test_neuron_files_and_edits_serve_the_same_model_in_every_dtype(tiny_models, tmp_path):
    from kn_plugin.locating import read_neurons_file

    model = tiny_models["tiny-llama"]
    loads = {dt: load_model("tiny-llama", dtype=dt) for dt in ("bfloat16", "float16")}
    # float16 rounds some weights across a bfloat16 boundary, so its fingerprint differs (why
    # files record the signature); the sign bits agree in every dtype
    assert loads["float16"].fingerprint != model.fingerprint
    assert {m.signature for m in loads.values()} == {model.signature}
    made = {"float32": model, **loads}
    for src_name, src in made.items():
        path = tmp_path / f"{src_name}.json"
        locate(src, "The capital of France is", " Paris", steps=4, progress=False).save(path)
        edit_path = WeightEdit(src.name, src.n_layers, src.d_mlp, [(0, 1)], read_slots(src, [(0, 1)]),
                               read_slots(src, [(0, 1)]) * 0.5, "update", {}, src.fingerprint,
                               src.signature).save(tmp_path / f"{src_name}.pt")
        for other in made.values():
            neurons, _ = read_neurons_file(path, other)
            assert neurons
            before = read_slots(other, [(0, 1)]).clone()
            with WeightEdit.load(edit_path).applied(other):
                assert not torch.equal(read_slots(other, [(0, 1)]), before)
            assert torch.equal(read_slots(other, [(0, 1)]), before)
    # a file of another model with the same shapes: a flipped sign in a non-slot weight
    data = json.loads((tmp_path / "float32.json").read_text())
    other = load_model("tiny-llama", dtype="float16")
    with torch.no_grad():
        other.hf_model.get_input_embeddings().weight[0, 0] *= -1
    assert other.signature != model.signature
    (tmp_path / "other.json").write_text(json.dumps({**data, "fingerprint": other.fingerprint,
                                                              "signature": other.signature}))
    with pytest.raises(KnowledgeNeuronError, match="was made for model"):
        read_neurons_file(tmp_path / "other.json", loads["float16"])
    # a file without a signature (older kn) still serves the dtypes its fingerprint covers
    del data["signature"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert read_neurons_file(tmp_path / "old.json", loads["bfloat16"])[0]
    with pytest.raises(KnowledgeNeuronError, match="was made for model"):
        read_neurons_file(tmp_path / "old.json", loads["float16"])
    # like the fingerprint, the signature ignores value-slot edits
    with _edit(model).applied(model):
        assert model.made(model.fingerprint, model.signature) and model.signature == loads["float16"].signature


def test_result_folder_refuses_an_edited_copy_and_another_dtype(tiny_models, tmp_path, capsys):
    model = tiny_models["tiny-llama"]
    list(locate_many(model, FACTS, out=tmp_path, progress=False, steps=4))
    with _edit(model).applied(model):
        with pytest.raises(KnowledgeNeuronError, match=r"other settings \(weights\)"):
            list(locate_many(model, FACTS, out=tmp_path, progress=False, steps=4))
    with pytest.raises(KnowledgeNeuronError, match=r"other settings \(dtype, weights\)"):
        list(locate_many(load_model("tiny-llama", dtype="bfloat16"), FACTS, out=tmp_path, progress=False, steps=4))
    again = dict(locate_many(model, FACTS, out=tmp_path, progress=False, steps=4))  # the same model resumes
    assert set(again) == {"france", "japan"}


def doubled(model, fact):  # a user's method, module level
    from kn_plugin.attribution import KnowledgeAttribution

    return 2 * KnowledgeAttribution(model).attribute(fact.input_ids, fact.target, layers=[], progress=False).activations


def negated(model, fact):
    return -doubled(model, fact)


def test_callable_methods_resume_only_under_a_name_that_tells_them_apart(tiny_models, tmp_path):
    from kn_plugin.attribution.methods import Method

    model, facts = tiny_models["tiny-llama"], FACTS[:1]
    first = dict(locate_many(model, facts, out=tmp_path / "a", progress=False, method=doubled))
    assert first["france"].method == "callable:doubled"
    again = dict(locate_many(model, facts, out=tmp_path / "a", progress=False, method=doubled))
    assert again["france"].neurons == first["france"].neurons
    with pytest.raises(KnowledgeNeuronError, match=r"other settings \(method\)"):
        list(locate_many(model, facts, out=tmp_path / "a", progress=False, method=negated))

    def nested(model, fact):
        return doubled(model, fact)

    for anonymous in (lambda m, f: doubled(m, f), nested):
        with pytest.raises(KnowledgeNeuronError, match="cannot tell"):
            list(locate_many(model, facts, out=tmp_path / "b", progress=False, method=anonymous))
    assert not (tmp_path / "b").exists()  # refused before anything was written
    named = Method("twice", "callable", lambda m, f: doubled(m, f))
    res = dict(locate_many(model, facts, out=tmp_path / "c", progress=False, method=named))
    assert dict(locate_many(model, facts, out=tmp_path / "c", progress=False, method=named)).keys() == res.keys()
    assert list(locate_many(model, facts, progress=False, method=lambda m, f: doubled(m, f)))  # no folder: no key


def test_a_key_given_again_with_other_content_is_refused(tiny_models, tmp_path):
    model = tiny_models["tiny-llama"]
    list(locate_many(model, FACTS, out=tmp_path, progress=False, steps=4))
    other = [Fact("Italy", "capital", " Rome", ("The capital of Italy is",), "france")]
    with pytest.raises(KnowledgeNeuronError, match="holds key 'france' for another fact"):
        list(locate_many(model, other, out=tmp_path, progress=False, steps=4))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_cleanup_removes_only_kn_temporaries_of_dead_processes(tmp_path):
    dead = _dead_pid()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep").mkdir()
    mine = [tmp_path / f".a.json.kn-{dead}.tmp", tmp_path / "sub" / f".b.json.npz.kn-{dead}.tmp.npz"]
    users = [tmp_path / ".notes.tmp", tmp_path / ".cache.tmp1", tmp_path / ".a.json.123.tmp",
             tmp_path / f".x.kn-{os.getppid()}.tmp",  # a live process: maybe still writing
             tmp_path / "sub" / "deep" / f".c.kn-{dead}.tmp"]  # not a folder kn writes records in
    for p in mine + users:
        p.write_text("x")
    removed = clear_own_temps(tmp_path, ("sub",))
    assert sorted(removed) == sorted(mine)
    assert all(p.exists() for p in users) and not any(p.exists() for p in mine)
    assert temp_path(tmp_path / "r.json").name == f".r.json.kn-{os.getpid()}.tmp"


def test_bench_folder_cleanup_spares_user_files(tmp_path):
    from kn_plugin.runs import clear_stale

    (tmp_path / "facts").mkdir()
    keep = [tmp_path / ".mine.tmp", tmp_path / "facts" / ".draft.tmp", tmp_path / "facts" / "notes.txt"]
    for p in keep:
        p.write_text("x")
    gone = tmp_path / "facts" / f".P19-00001.json.kn-{_dead_pid()}.tmp"
    gone.write_text("{")
    clear_stale(tmp_path)
    assert all(p.exists() for p in keep) and not gone.exists()


@pytest.fixture(scope="module")
def two_results(tiny_models):
    model = tiny_models["tiny-llama"]
    a = locate(model, list(FACTS[0].prompts), FACTS[0].target, steps=4, progress=False)
    b = locate(model, list(FACTS[1].prompts), FACTS[1].target, steps=4, progress=False)
    return a, b


def test_json_paired_with_another_results_arrays_does_not_load(two_results, tmp_path):
    a, b = two_results
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    shutil.copy(tmp_path / "b.json.npz", tmp_path / "a.json.npz")
    with pytest.raises(KnowledgeNeuronError, match="belongs to another result"):
        LocateResult.load(tmp_path / "a.json")
    (tmp_path / "b.json.npz").write_bytes((tmp_path / "b.json.npz").read_bytes()[:100])  # truncated
    with pytest.raises(KnowledgeNeuronError):
        LocateResult.load(tmp_path / "b.json")


def test_a_mixed_or_truncated_result_is_located_again(tiny_models, tmp_path):
    model = tiny_models["tiny-llama"]
    first = dict(locate_many(model, FACTS, out=tmp_path, progress=False, steps=4))
    shutil.copy(tmp_path / "japan.json.npz", tmp_path / "france.json.npz")
    (tmp_path / "japan.json").write_text((tmp_path / "japan.json").read_text()[:50])
    again = dict(locate_many(model, FACTS, out=tmp_path, progress=False, steps=4))
    for key in first:
        assert again[key].neurons == first[key].neurons
        assert torch.equal(again[key].attributions[0].scores, first[key].attributions[0].scores)
        assert LocateResult.load(tmp_path / f"{key}.json").target == first[key].target


WRITER = """
import sys, itertools
from kn_plugin.locating import LocateResult
a, b = LocateResult.load(sys.argv[1]), LocateResult.load(sys.argv[2])
print("ready", flush=True)
for r in itertools.cycle((a, b)):
    r.save(sys.argv[3])
    print("saved", flush=True)
"""


def test_killing_a_writer_in_a_loop_never_leaves_a_result_that_loads_wrong(two_results, tmp_path):
    a, b = two_results
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    target = tmp_path / "out" / "r.json"
    target.parent.mkdir()
    good = {a.target: a, b.target: b}
    outcomes = {"a": 0, "b": 0, "refused": 0}
    for i in range(12):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                                 str(target)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        if i % 2:  # every other kill comes after a finished write, however loaded the machine is
            assert proc.stdout.readline().strip() == "saved"
        time.sleep(0.005 * (i % 7))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not target.exists():
            continue
        try:
            got = LocateResult.load(target)
        except KnowledgeNeuronError:
            outcomes["refused"] += 1
            continue
        ref = good[got.target]
        assert got.neurons == ref.neurons and got.prompts == ref.prompts
        assert torch.equal(got.attributions[0].scores, ref.attributions[0].scores)  # never another's arrays
        outcomes["a" if ref is a else "b"] += 1
    assert outcomes["a"] + outcomes["b"] > 0
    # the writers were killed: their temporaries are kn's own and get cleared, nothing else is there
    clear_own_temps(target.parent)
    assert sorted(p.name for p in target.parent.iterdir()) == ["r.json", "r.json.npz"]


def test_pararel_folder_refuses_an_edited_model(tmp_path, tiny_models):
    from kn_plugin.runs import check_run

    model = tiny_models["tiny-llama"]
    check_run(tmp_path, {**model.identity(), "steps": 20})
    with _edit(model).applied(model):
        with pytest.raises(KnowledgeNeuronError, match=r"other settings \(weights\)"):
            check_run(tmp_path, {**model.identity(), "steps": 20})
    check_run(tmp_path, {**model.identity(), "steps": 20})
    assert json.loads(Path(tmp_path / ".kn_run").read_text())["weights"] == model.identity()["weights"]


def test_a_port_that_is_not_ray_fails_in_seconds(capsys):
    import http.server
    import socket
    import threading

    from kn_plugin.cli import main

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

    web = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        for port in (web.server_address[1], silent.getsockname()[1]):
            t0 = time.perf_counter()
            assert main(["bench", "pararel", "--model", "tiny-llama", "--workers", "1", "--ray-address",
                         f"127.0.0.1:{port}", "--out", "/tmp/never-written"]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith("kn: error:") and len(err.splitlines()) == 1 and "is not a Ray cluster" in err, err
            assert time.perf_counter() - t0 < 10
    finally:
        web.shutdown()
        silent.close()
    assert not Path("/tmp/never-written").exists()


def test_facts_file_prompts_as_one_string_is_refused(tmp_path):
    from kn_plugin.data import read_facts_jsonl

    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"prompts": "The capital of France is", "target": " Paris"}) + "\n")
    with pytest.raises(KnowledgeNeuronError, match="must be a list of strings"):
        read_facts_jsonl(path)
    path.write_text(json.dumps({"prompt": "The capital of France is", "target": " Paris"}) + "\n")
    assert read_facts_jsonl(path)[0].prompts == ("The capital of France is",)


def test_erase_with_more_min_facts_than_facts_is_refused_before_loading(tmp_path, capsys):
    from kn_plugin.cli import main

    path = tmp_path / "f.jsonl"
    path.write_text("".join(json.dumps({"prompts": list(f.prompts), "target": f.target}) + "\n" for f in FACTS))
    save = tmp_path / "e.pt"
    assert main(["edit", "erase", "--model", "tiny-llama", "--facts", str(path), "--min-facts", "3",
                 "--save", str(save)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kn: error:") and "more than the 2 facts" in err and len(err.splitlines()) == 1
    assert not save.exists()


def test_special_token_targets_are_refused(tiny_models):
    from kn_plugin.scoring import encode_fact

    bert = tiny_models["tiny-bert"]
    for target in ("[MASK]", "[SEP]", "paris [SEP]"):
        with pytest.raises(KnowledgeNeuronError, match="special token"):
            encode_fact(bert, "The capital of France is [MASK] .", target)
    llama = tiny_models["tiny-llama"]
    eos = llama.tokenizer.eos_token
    with pytest.raises(KnowledgeNeuronError, match="special token"):
        encode_fact(llama, "The capital of France is", eos)
    assert encode_fact(llama, "The capital of France is", " Paris").target_ids


def test_records_without_their_run_file_are_not_reused(tmp_path):
    from kn_plugin.runs import check_run

    (tmp_path / "facts").mkdir()
    (tmp_path / "facts" / "P19-00001.json").write_text("{}")
    with pytest.raises(KnowledgeNeuronError, match="holds records but no .kn_run"):
        check_run(tmp_path, {"model": "m"})
    check_run(tmp_path / "new", {"model": "m"})  # a new folder starts its run file
    assert (tmp_path / "new" / ".kn_run").is_file()


def test_booting_a_bridge_leaves_no_temporary_tokenizer_folder(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = load_model("tiny-gpt2")
    bridge = model.bridge()
    assert not any(p.name.startswith("kn_plugin_tokenizer_") for p in tmp_path.iterdir())
    ids = bridge.to_tokens("The capital of France is")
    assert ids.shape[-1] >= 5 and bridge.tokenizer.decode(ids[0, -1:]).strip() == "is"


def test_weights_digest_covers_zero_dim_buffers():
    """Gemma keeps its embedding scale as a 0-dim buffer: the digest reads it like any tensor."""
    from kn_plugin.models import wrap
    from kn_plugin.tiny import tiny_family

    hf, tok = tiny_family("gemma3")
    scale = hf.model.embed_tokens.embed_scale
    assert scale.dim() == 0
    model = wrap(hf, tok)
    base = model.identity()
    with torch.no_grad():
        old = scale.clone()
        scale.mul_(2.0)
        changed = model.weights_digest()
        scale.copy_(old)
    assert changed != base["weights"]
    assert model.identity() == base


def test_a_record_another_run_wrote_meanwhile_is_used_not_recomputed(tmp_path):
    from kn_plugin.runs import content_stage, write_atomic

    jobs = [(k, f"hash-{k}", k) for k in ("a", "b", "c")]
    computed = []

    def run(todo):
        for key, payload in todo:
            computed.append(key)
            if key == "a":  # meanwhile another run on the folder finishes "b" (and a stale "c")
                write_atomic(tmp_path / "stage" / "b.json", {"value": "theirs", "input": "hash-b"})
                write_atomic(tmp_path / "stage" / "c.json", {"value": "stale", "input": "other"})
            yield key, {"value": f"ours-{payload}"}

    done, hashes = content_stage(tmp_path, "stage", jobs, run, "stage", progress=False)
    assert computed == ["a", "c"]  # "b" taken from the other run; "c" held other inputs
    assert done["b"]["value"] == "theirs" and done["c"]["value"] == "ours-c"
    assert hashes == {k: h for k, h, _ in jobs}
    assert json.loads((tmp_path / "stage" / "c.json").read_text())["input"] == "hash-c"


def test_two_runs_on_one_folder_meet_in_the_middle_with_reverse(tmp_path):
    """A forward and a reverse run on the same jobs, taking turns: each record is computed once."""
    from kn_plugin.runs import content_stage

    jobs = [(k, f"hash-{k}", k) for k in "abcdef"]
    computed = []

    def runner(name):
        def run(todo):
            for key, payload in todo:
                computed.append((name, key))
                yield key, {"value": payload, "by": name}
        return run

    forward = content_stage(tmp_path, "stage", jobs[:2], runner("forward"), "stage", progress=False)[0]
    back = content_stage(tmp_path, "stage", jobs, runner("reverse"), "stage", progress=False, reverse=True)[0]
    assert [k for _, k in computed] == ["a", "b", "f", "e", "d", "c"]  # the reverse run skips what was done
    assert {k: r["by"] for k, r in back.items()} == {**{k: "forward" for k in "ab"}, **{k: "reverse" for k in "cdef"}}
    assert set(forward) == {"a", "b"}
