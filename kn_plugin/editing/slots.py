"""Value slots: row ``i`` of layer ``l``'s FFN output weight, read and written in the framework's own
storage; the token embeddings edits add and remove."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.interventions import group_by_layer
from kn_plugin.models import LoadedModel, accepts_model


def _first(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _slots(neurons: Iterable) -> list[tuple[int, int]]:
    return [(layer, int(i)) for layer, idx in group_by_layer(neurons).items() for i in idx.tolist()]


@accepts_model(freeze=False)
def read_slots(model: LoadedModel, slots: list[tuple[int, int]]) -> torch.Tensor:
    """Current value-slot rows [len(slots), d_model] (a copy)."""
    return torch.stack([model.adapter.value_slots(layer)[i].detach().clone() for layer, i in slots])


@accepts_model(freeze=False)
@torch.no_grad()
def write_slots(model: LoadedModel, slots: list[tuple[int, int]], rows: torch.Tensor) -> None:
    for (layer, i), row in zip(slots, rows):
        model.adapter.value_slots(layer)[i].copy_(row)


@accepts_model(freeze=False)
def token_embedding(model: LoadedModel, target: str) -> tuple[torch.Tensor, int]:
    """Input embedding of the first token of ``target`` (see the module docstring)."""
    ids = model.tokenizer(target, add_special_tokens=False)["input_ids"]
    if not target.strip() or not ids:
        raise KnowledgeNeuronError(f"the target {target!r} tokenizes to nothing")
    return model.adapter.word_embeddings()[ids[0]].detach(), ids[0]


def _check_neurons(model: LoadedModel, neurons) -> list[tuple[int, int]]:
    group_by_layer(neurons, model.n_layers, model.d_mlp)  # range checks
    slots = _slots(neurons)
    if not slots:
        raise KnowledgeNeuronError("no neurons to edit")
    return slots
