"""kn inspect: value slots through the unembedding, top-activating sentences."""

import json

import pytest
import torch
from conftest import TINY

from kn_plugin.cli import main
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.inspection import inspect_neuron, value_slot_logits

# test-local knowledge of where each tiny family keeps its FFN output projection
DOWN = {"tiny-llama": "model.layers.{l}.mlp.down_proj", "tiny-gpt2": "transformer.h.{l}.mlp.c_proj",
        "tiny-bert": "bert.encoder.layer.{l}.output.dense"}
SENTENCES = ["The capital of France is Paris.", "Berlin is the capital of Germany.", "Tokyo is big.",
             "People in Italy speak Italian and eat pasta every day.", "Rome", "A cat sat on the mat."]


def _module(model, name, layer):
    return model.hf_model.get_submodule(DOWN[name].format(l=layer))


@pytest.mark.parametrize("name", TINY)
def test_value_slot_projection_by_hand(tiny_models, name):
    model = tiny_models[name]
    layer, index = model.n_layers - 1, 7
    w = _module(model, name, layer).weight.detach()
    slot = w[index] if name == "tiny-gpt2" else w[:, index]  # Conv1D [in, out]; Linear [out, in]
    by_hand = model.hf_model.get_output_embeddings().weight.detach() @ slot
    assert torch.allclose(value_slot_logits(model, layer, index), by_hand, rtol=1e-5, atol=1e-6)
    report = inspect_neuron(model, layer, index, top=5)
    top = torch.topk(by_hand, 5).indices.tolist()
    bottom = torch.topk(-by_hand, 5).indices.tolist()
    assert [t for t, _ in report.promoted] == [model.tokenizer.decode([i]) for i in top]
    assert [t for t, _ in report.suppressed] == [model.tokenizer.decode([i]) for i in bottom]


@pytest.mark.parametrize("name", TINY)
def test_top_sentences_equal_a_brute_force_scan(tiny_models, name):
    model = tiny_models[name]
    layer, index = 1, 3
    scan = []
    for s in SENTENCES:  # one sentence at a time, plain pre-hook on the projection's input
        seen = {}
        handle = _module(model, name, layer).register_forward_pre_hook(lambda m, a, seen=seen: seen.setdefault("a", a[0]))
        try:
            with torch.no_grad():
                model.hf_model(torch.tensor([model.tokenizer(s)["input_ids"]]))
        finally:
            handle.remove()
        acts = seen["a"][0, :, index]
        scan.append((s, acts.max().item(), int(acts.argmax())))
    scan.sort(key=lambda x: -x[1])
    report = inspect_neuron(model, layer, index, corpus=SENTENCES, top=4, batch_size=4)
    assert [a.sentence for a in report.top_sentences] == [s for s, _, _ in scan[:4]]
    for a, (_, value, pos) in zip(report.top_sentences, scan):
        assert a.activation == pytest.approx(value, rel=1e-5, abs=1e-6) and a.position == pos
    n_tokens = sum(len(model.tokenizer(s)["input_ids"]) for s in SENTENCES)
    assert len(report.activations) == n_tokens
    assert "[[" in report.top_sentences[0].marked(model.tokenizer)


def test_inspect_cli(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "n.json"
    assert main(["inspect", "--model", "tiny-llama", "--neuron", "1:3", "--corpus", str(corpus), "--top", "3",
                 "--json", str(out), "--plot", str(tmp_path / "h.png")]) == 0
    data = json.loads(out.read_text())
    assert data["layer"] == 1 and len(data["promoted"]) == 3 and len(data["top_sentences"]) == 3
    assert all("[[" in row["marked"] for row in data["top_sentences"])
    assert (tmp_path / "h.png").stat().st_size > 0
    capsys.readouterr()
    for argv, match in ((["--neuron", "1-3"], "LAYER:INDEX"), (["--neuron", "9:3"], "out of range"),
                        (["--neuron", "1:99999"], "out of range"), (["--neuron", "1:3", "--plot", "x.png"], "--corpus")):
        assert main(["inspect", "--model", "tiny-llama", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("kn: error:") and len(err.splitlines()) == 1 and match in err, err
    with pytest.raises(KnowledgeNeuronError, match="integer"):
        inspect_neuron("tiny-llama", 1, 2.5)
