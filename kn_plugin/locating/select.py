"""Coarse and refined knowledge neurons (Dai et al. 2021, section 3.2-3.3).

* coarse: neurons whose IG score exceeds ``t x`` the largest score of the prompt (t = 0.2);
* refined: coarse neurons shared by *more than* a fraction ``p`` of the fact's prompts.
  The paper starts from p = 0.7 and, in its adaptive mode, moves p by 0.05 until the fact
  keeps between 2 and 5 neurons (or p cannot move further);
* baseline selector: the same pipeline driven by raw activations instead of IG scores.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from kn_plugin.attribution import AttributionResult
from kn_plugin.errors import KnowledgeNeuronError

DEFAULT_THRESHOLD = 0.2


DEFAULT_SHARE = 0.7


ADAPTIVE_STEP = 0.05


ADAPTIVE_RANGE = (2, 5)


@dataclass(frozen=True, order=True)
class Neuron:
    layer: int
    index: int
    score: float = field(default=0.0, compare=False)

    @property
    def key(self) -> tuple[int, int]:
        return (self.layer, self.index)


def check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise KnowledgeNeuronError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def _select(values: torch.Tensor, threshold: float) -> list[Neuron]:
    """Neurons with value > threshold * max(values); values: [n_layers, d_mlp]."""
    check_fraction("threshold", threshold)
    top = values.max()
    if top <= 0:
        return []
    idx = (values > threshold * top).nonzero().tolist()
    return sorted((Neuron(int(layer), int(i), float(values[layer, i])) for layer, i in idx),
                  key=lambda n: -n.score)


def coarse_neurons(result: AttributionResult, threshold: float = DEFAULT_THRESHOLD) -> list[Neuron]:
    """Neurons with IG score > ``threshold`` x the maximum score of this prompt."""
    return _select(result.scores, threshold)


def activation_neurons(result: AttributionResult, threshold: float = DEFAULT_THRESHOLD) -> list[Neuron]:
    """The paper's baseline: neurons with activation > ``threshold`` x the maximum activation."""
    return _select(result.activations, threshold)


def refine(coarse_sets: list[list[Neuron]], share: float = DEFAULT_SHARE) -> list[Neuron]:
    """Neurons present in more than ``share`` of the prompts' coarse sets (mean score kept)."""
    check_fraction("share", share)
    n = len(coarse_sets)
    counts = Counter(nrn.key for s in coarse_sets for nrn in set(s))
    sums: dict[tuple[int, int], float] = {}
    for s in coarse_sets:
        for nrn in s:
            sums[nrn.key] = sums.get(nrn.key, 0.0) + nrn.score
    kept = [Neuron(k[0], k[1], sums[k] / n) for k, c in counts.items() if c > share * n]
    return sorted(kept, key=lambda nrn: -nrn.score)


def refine_adaptive(
    coarse_sets: list[list[Neuron]], share: float = DEFAULT_SHARE,
    keep: tuple[int, int] = ADAPTIVE_RANGE, step: float = ADAPTIVE_STEP,
) -> tuple[list[Neuron], float]:
    """Move ``share`` by ``step`` until the refined set size lies in ``keep`` (paper's tuning).

    With few prompts no ``share`` may land in the range (every value of p between two
    multiples of 1/n keeps the same set). Then the non-empty set closest to the range is
    returned, so an overshoot from "too many" to "none" never erases the answer.
    """
    lo, hi = keep
    seen = [(refine(coarse_sets, share), share)]
    direction = 0
    while not lo <= len(seen[-1][0]) <= hi:
        new_dir = 1 if len(seen[-1][0]) > hi else -1
        nxt = round(seen[-1][1] + new_dir * step, 10)
        if direction == -new_dir or not 0 < nxt <= 1:
            break  # oscillating or out of range
        direction = new_dir
        seen.append((refine(coarse_sets, nxt), nxt))
    if lo <= len(seen[-1][0]) <= hi:
        return seen[-1]
    nonempty = [s for s in seen if s[0]]
    if not nonempty:
        return seen[-1]
    return min(nonempty, key=lambda s: max(lo - len(s[0]), len(s[0]) - hi))
