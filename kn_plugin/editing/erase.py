"""Erasing a relation: the value slots of neurons shared by many of its facts set to the unknown
token's embedding (or zeros, or the mean embedding)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

import torch

from kn_plugin.editing.edit import WeightEdit
from kn_plugin.editing.slots import _slots, read_slots
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.interventions import group_by_layer
from kn_plugin.models import LoadedModel, accepts_model
from kn_plugin.validation import integer

logger = logging.getLogger(__name__)


def shared_neurons(neuron_sets: list[Iterable], min_facts: int = 5) -> list[tuple[int, int, int]]:
    """``(layer, index, n_facts)`` for neurons found in at least ``min_facts`` of the sets."""
    counts = Counter(s for neurons in neuron_sets for s in set(_slots(neurons)))
    return sorted((layer, i, c) for (layer, i), c in counts.items() if c >= min_facts)


def neuron_shares(neuron_sets: list[Iterable]) -> dict[tuple[int, int], float]:
    """Fraction of a relation's facts whose neurons include each neuron (for ``update_fact``'s
    ``shared``: the released code skips neurons shared by more than 10% of the facts)."""
    if not neuron_sets:
        raise KnowledgeNeuronError("the relation has no facts")
    counts = Counter(s for neurons in neuron_sets for s in set(_slots(neurons)))
    return {slot: c / len(neuron_sets) for slot, c in counts.items()}


@accepts_model(freeze=False)
def replacement_vector(model: LoadedModel, replacement: str = "auto") -> tuple[torch.Tensor, str]:
    """The vector erased slots are set to, and a description of it."""
    emb = model.adapter.word_embeddings().detach()
    unk = getattr(model.tokenizer, "unk_token_id", None)
    if replacement == "auto":
        replacement = "unk" if unk is not None else "mean"
    if replacement == "unk":
        if unk is None:
            raise KnowledgeNeuronError("this tokenizer has no unknown token: use 'zero' or 'mean'")
        return emb[unk], f"unk ({model.tokenizer.unk_token!r}, id {unk})"
    if replacement == "zero":
        return torch.zeros_like(emb[0]), "zero"
    if replacement == "mean":
        return emb.mean(0), "mean embedding"
    raise KnowledgeNeuronError(f"replacement must be auto, unk, zero or mean, got {replacement!r}")


@accepts_model
def erase_relation(model: LoadedModel, neuron_sets: list[Iterable], min_facts: int = 5,
                   replacement: str = "auto") -> WeightEdit:
    """Erase a relation: slots of neurons shared by >= ``min_facts`` facts get ``replacement``."""
    neuron_sets = [list(s) for s in neuron_sets]
    if not neuron_sets:
        raise KnowledgeNeuronError("the relation has no facts")
    if integer("min_facts", min_facts) < 1:
        raise KnowledgeNeuronError(f"min_facts must be >= 1, got {min_facts}")
    for s in neuron_sets:
        group_by_layer(s, model.n_layers, model.d_mlp)
    common = shared_neurons(neuron_sets, min_facts)
    slots = [(layer, i) for layer, i, _ in common]
    vec, described = replacement_vector(model, replacement)
    if not slots:
        logger.warning("no neuron is shared by %d facts: nothing to erase", min_facts)
    old = read_slots(model, slots) if slots else torch.empty(0, model.adapter.d_model)
    new = vec.to(old.dtype).expand(len(slots), -1).clone()
    return WeightEdit(model.name, model.n_layers, model.d_mlp, slots, old, new, "erase",
                      {"min_facts": min_facts, "replacement": described,
                       "n_facts": len(neuron_sets), "shared_counts": [c for *_, c in common]},
                      model.fingerprint, model.signature)
