"""What one FFN neuron does: the tokens its value slot writes towards, and the sentences that
activate it.

* value-slot projection: ``W_U @ v`` with ``v`` the neuron's value slot (its row of the FFN
  output projection) and ``W_U`` the model's unembedding (output embedding) matrix: the tokens
  the neuron promotes (largest) and suppresses (smallest) when it fires positively, in the
  "logit lens" reading of Geva et al. (2022), without the final norm;
* top-activating sentences: the neuron's activation at every token of every sentence of a
  corpus, each sentence's largest activation and the token where it happens.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kn_plugin.data import _jsonl, pararel_dir, pararel_relations
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.models import LoadedModel, accepts_model
from kn_plugin.scoring import max_len
from kn_plugin.validation import integer, positive_int, read_text


@dataclass
class Activation:
    """A corpus sentence's largest activation of the neuron and where it happens."""

    sentence: str
    activation: float
    position: int  # token position (in the model's tokenization of the sentence)
    token: str

    def marked(self, tokenizer) -> str:
        """The sentence with the activating token in ``[[...]]``."""
        ids = tokenizer(self.sentence)["input_ids"]
        before = tokenizer.decode(ids[:self.position], skip_special_tokens=True)
        token = tokenizer.decode(ids[self.position:self.position + 1], skip_special_tokens=True)
        after = tokenizer.decode(ids[self.position + 1:], skip_special_tokens=True)
        return f"{before}[[{token}]]{after}"


@dataclass
class NeuronReport:
    """:func:`inspect_neuron`'s answer."""

    model: str
    layer: int
    index: int
    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]
    top_sentences: list[Activation] = field(default_factory=list)
    activations: list[float] = field(default_factory=list)  # every token of the corpus (the histogram)

    def to_dict(self, tokenizer=None) -> dict:
        out = asdict(self)
        out.pop("activations")
        if tokenizer is not None:
            for row, act in zip(out["top_sentences"], self.top_sentences):
                row["marked"] = act.marked(tokenizer)
        out["n_tokens"] = len(self.activations)
        return out


def parse_neuron(text: str) -> tuple[int, int]:
    """``"L:I"`` -> (layer, index)."""
    layer, sep, index = str(text).partition(":")
    if not sep or not layer.strip().isdigit() or not index.strip().isdigit():
        raise KnowledgeNeuronError(f"--neuron takes LAYER:INDEX, e.g. 24:1130, got {text!r}")
    return int(layer), int(index)


def value_slot_logits(model: LoadedModel, layer: int, index: int) -> torch.Tensor:
    """[vocab] ``W_U @ value_slot``: what the neuron writes, read through the unembedding."""
    slot = model.adapter.value_slots(layer)[index].detach().float()
    head = model.hf_model.get_output_embeddings()
    if head is None:
        raise KnowledgeNeuronError(f"{model.name} has no output embedding to read value slots through")
    weight = head.weight.detach().float()  # [vocab, d_model]
    if weight.shape[1] != slot.shape[0]:
        raise KnowledgeNeuronError(f"{model.name}: the unembedding takes {weight.shape[1]} dims, value slots have "
                                   f"{slot.shape[0]} (a projection in between is not supported)")
    return weight @ slot


def _check_neuron(model: LoadedModel, layer, index) -> tuple[int, int]:
    layer, index = integer("layer", layer), integer("index", index)
    model.adapter.check_layer(layer)
    if not 0 <= index < model.d_mlp:
        raise KnowledgeNeuronError(f"neuron index {index} out of range: layer {layer} has {model.d_mlp} neurons")
    return layer, index


def sentence_activations(model: LoadedModel, sentences: list[str], layer: int, index: int,
                         batch_size: int = 16) -> list[torch.Tensor]:
    """Per sentence, the neuron's activation at every token ([seq]); sentences run in
    right-padded batches (pads after every real token; masked out)."""
    tok = model.tokenizer
    pad = next((i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None), 0)
    limit = max_len(model)
    encoded = [tok(s)["input_ids"] for s in sentences]  # tokenized once: checked here, run below
    for number, row in enumerate(encoded, 1):
        if limit is not None and len(row) > limit:
            raise KnowledgeNeuronError(f"sentence {number} is {len(row)} tokens, longer than the model's context of "
                                       f"{limit}: split it")
    out: list[torch.Tensor] = []
    for start in range(0, len(sentences), batch_size):
        ids = encoded[start:start + batch_size]
        length = max(len(i) for i in ids)
        batch = torch.full((len(ids), length), pad, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for r, row in enumerate(ids):
            batch[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        grabbed = {}

        def grab(act, grabbed=grabbed):
            grabbed["a"] = act[..., index].detach().float().cpu()
            return act

        with model.adapter.patched({layer: grab}), torch.no_grad():
            model.hf_model(batch.to(model.device), attention_mask=mask.to(model.device))
        out += [grabbed["a"][r, :len(row)] for r, row in enumerate(ids)]
    return out


@accepts_model
def inspect_neuron(model: LoadedModel, layer: int, index: int, corpus: list[str] | None = None, top: int = 10,
                   batch_size: int = 16) -> NeuronReport:
    """Tokens the neuron's value slot promotes and suppresses, and (with ``corpus``, a list of
    sentences) the ``top`` sentences that activate it most, with the activating token."""
    layer, index = _check_neuron(model, layer, index)
    top = positive_int("top", top)
    logits = value_slot_logits(model, layer, index)
    k = min(top, logits.numel())
    dec = model.tokenizer.decode
    hi, lo = torch.topk(logits, k), torch.topk(-logits, k)
    promoted = [(dec([i]), v) for i, v in zip(hi.indices.tolist(), hi.values.tolist())]
    suppressed = [(dec([i]), -v) for i, v in zip(lo.indices.tolist(), lo.values.tolist())]
    report = NeuronReport(model.name, layer, index, promoted, suppressed)
    if corpus:
        sentences = [s for s in corpus if s.strip()]
        acts = sentence_activations(model, sentences, layer, index, batch_size)
        best = []
        for s, a in zip(sentences, acts):
            pos = int(a.argmax())
            ids = model.tokenizer(s)["input_ids"]
            best.append(Activation(s, float(a[pos]), pos, dec(ids[pos:pos + 1])))
        best.sort(key=lambda x: -x.activation)
        report.top_sentences = best[:top]
        report.activations = torch.cat(acts).tolist() if acts else []
    return report


def read_corpus(path: str | Path) -> list[str]:
    """One sentence a line (blank lines skipped)."""
    lines = [line.strip() for line in read_text(path, "corpus").splitlines() if line.strip()]
    if not lines:
        raise KnowledgeNeuronError(f"{path} holds no sentences")
    return lines


def pararel_sentences(folder, relations: list[str] | None = None, limit: int | None = None, seed: int = 0) -> list[str]:
    """Complete PARAREL sentences (each template with its subject and object filled in)."""

    root = pararel_dir(folder)
    out = []
    for rel in pararel_relations(root, relations):
        patterns = [row["pattern"] for row in _jsonl(root / "patterns" / f"{rel}.jsonl", ("pattern",))]
        facts_path = root / "facts" / f"{rel}.jsonl"
        if not facts_path.exists():
            continue
        for row in _jsonl(facts_path, ("sub_label", "obj_label")):
            for p in patterns:
                out.append(p.strip().replace("[X]", row["sub_label"]).replace("[Y]", row["obj_label"]))
    if limit is not None and len(out) > limit:
        out = random.Random(seed).sample(out, limit)
    return out
