"""Second moments of FFN keys (neuron activations) over a corpus: ``C = E[k k^T]``.

The statistic ROME's closed form and kn's constrained update weigh a value-slot change by: a
change ``dV`` of value slots is seen by a key ``k`` as ``dV^T k``, and its energy over the
corpus is ``tr(dV^T C dV)``. Keys are read at the model's own neuron site
(``adapter.patch_site``) on every token of each text, texts right-padded in batches (under
causal attention no real token sees the padding), accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.models import LoadedModel, accepts_model


def padded(seqs: Sequence[Sequence[int]], device) -> torch.Tensor:
    """Right-padded batch of token ids."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return ids


def corpus_ids(model: LoadedModel, texts: Iterable[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each non-blank text, cut to ``max_tokens``."""
    return [ids[:max_tokens] for ids in (model.tokenizer(t)["input_ids"] for t in texts if t and t.strip()) if ids]


@accepts_model
@torch.no_grad()
def second_moment(model: LoadedModel, slots: Sequence[tuple[int, int]], texts: Iterable[str],
                  max_tokens: int = 128, batch: int = 16) -> tuple[torch.Tensor, int]:
    """``(C, n_tokens)``: ``C = (1/n) sum_tokens k k^T`` [len(slots), len(slots)] (float64) of
    the activations of ``slots`` ((layer, index) pairs, any layers) over every token of
    ``texts``. Refuses a corpus with fewer tokens than slots (``C`` would be singular)."""
    slots = [(model.adapter.check_layer(layer), int(i)) for layer, i in slots]
    if not slots:
        raise KnowledgeNeuronError("no neurons to take key statistics of")
    seqs = corpus_ids(model, texts, max_tokens)
    n_tokens = sum(len(s) for s in seqs)
    if n_tokens < len(slots):
        raise KnowledgeNeuronError(f"the corpus has {n_tokens} tokens, fewer than the {len(slots)} keys: "
                                   "their second moment would be singular; give more text")
    layers = sorted({layer for layer, _ in slots})
    where = {layer: [j for j, (lay, _) in enumerate(slots) if lay == layer] for layer in layers}
    index = {layer: torch.tensor([slots[j][1] for j in where[layer]]) for layer in layers}
    total = torch.zeros((len(slots), len(slots)), dtype=torch.float64)
    for lo in range(0, len(seqs), batch):
        chunk = seqs[lo:lo + batch]
        mask = torch.zeros((len(chunk), max(len(s) for s in chunk)), dtype=torch.bool)
        for i, s in enumerate(chunk):
            mask[i, :len(s)] = True
        keys = torch.zeros((int(mask.sum()), len(slots)), dtype=torch.float64)

        def grab(act, layer, mask=mask, keys=keys):
            keys[:, where[layer]] = act[mask.to(act.device)][:, index[layer].to(act.device)].double().cpu()
            return act

        with model.adapter.patched({layer: (lambda act, layer=layer: grab(act, layer)) for layer in layers}):
            model.hf_model(padded(chunk, model.device))
        total += keys.T @ keys
    return total / n_tokens, n_tokens


@dataclass(frozen=True)
class CorpusKeys:
    """Every neuron's activation on every token of a corpus, [tokens, n_layers, d_mlp]
    (float32), read once so that the second moment of any neurons is an index away."""

    keys: torch.Tensor
    fingerprint: str  # the model (and weights) they were read from
    weights: str

    def check(self, model: LoadedModel) -> None:
        if (self.fingerprint, self.weights) != (model.fingerprint, model.weights_digest()):
            raise KnowledgeNeuronError("these corpus keys were read from another model (or other weights)")

    def second_moment(self, slots: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, int]:
        """As :func:`second_moment` of ``slots`` over the same texts."""
        if not slots:
            raise KnowledgeNeuronError("no neurons to take key statistics of")
        n = self.keys.shape[0]
        if n < len(slots):
            raise KnowledgeNeuronError(f"the corpus has {n} tokens, fewer than the {len(slots)} keys: "
                                       "their second moment would be singular; give more text")
        k = self.keys[:, [layer for layer, _ in slots], [i for _, i in slots]].double()
        return k.T @ k / n, n


@accepts_model
@torch.no_grad()
def corpus_keys(model: LoadedModel, texts: Iterable[str], max_tokens: int = 128, batch: int = 16) -> CorpusKeys:
    """Every neuron's activation on every token of ``texts`` (each cut to ``max_tokens``)."""
    seqs = corpus_ids(model, texts, max_tokens)
    if not seqs:
        raise KnowledgeNeuronError("the corpus has no text to read keys from")
    rows = []
    for lo in range(0, len(seqs), batch):
        chunk = seqs[lo:lo + batch]
        mask = torch.zeros((len(chunk), max(len(s) for s in chunk)), dtype=torch.bool)
        for i, s in enumerate(chunk):
            mask[i, :len(s)] = True
        per_layer: dict[int, torch.Tensor] = {}

        def grab(act, layer, mask=mask, per_layer=per_layer):
            per_layer[layer] = act[mask.to(act.device)].float().cpu()
            return act

        with model.adapter.patched({layer: (lambda act, layer=layer: grab(act, layer)) for layer in range(model.n_layers)}):
            model.hf_model(padded(chunk, model.device))
        rows.append(torch.stack([per_layer[layer] for layer in range(model.n_layers)], 1))
    return CorpusKeys(torch.cat(rows), model.fingerprint, model.weights_digest())
