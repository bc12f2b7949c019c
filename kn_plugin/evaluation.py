"""Evaluation: target probabilities with and without interventions on knowledge neurons."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from kn_plugin.assess import EncodedFact, target_log_prob
from kn_plugin.interventions import scale_neurons
from kn_plugin.models import LoadedModel


@torch.no_grad()
def target_probs(model: LoadedModel, facts: Sequence[EncodedFact]) -> list[float]:
    """P(target | prompt) for each encoded fact."""
    return [target_log_prob(model.hf_model(f.input_ids).logits, f).exp()[0].item() for f in facts]


def intervened_probs(model: LoadedModel, facts: Sequence[EncodedFact], neurons: Iterable,
                     factor: float, all_positions: bool = False) -> list[float]:
    """P(target) with the neurons scaled by ``factor`` at each fact's prediction position
    (or at every position with ``all_positions=True``)."""
    neurons = list(neurons)
    out = []
    for f in facts:
        with scale_neurons(model, neurons, factor, position=None if all_positions else f.pred_pos):
            out.extend(target_probs(model, [f]))
    return out
