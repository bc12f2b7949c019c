"""``steps="adaptive"``: each layer's integral refined where its own path needs it.

Every layer starts with the rule's ``ADAPTIVE_POINTS`` points on [0, 1]. A layer whose
completeness gap is within ``tolerance`` of its effect (plus ``ADAPTIVE_GAP_SLACK`` x P(target))
keeps them (a smooth path: on SmolLM2
29 of 30 layers). The others are integrated by a composite rule that bisects where the path
bends: an interval's error is estimated from the rule itself, as the largest difference over
the layer's neurons between the rule on the interval and the rule on its sub-intervals (the
classic adaptive quadrature estimate, here one estimate per neuron). An interval whose estimate
exceeds ``neuron_tolerance`` times the largest score (over every layer, as it stands) is split
again; the layer is done when none is, and its completeness gap meets ``tolerance``.

All pending intervals of all layers are evaluated together, each round in as few passes as the
memory budget allows (``EngineRun.gradients``): a step in one layer's path costs a few rounds of
that layer's points, not a finer grid for every layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kn_plugin.attribution.grid import integration_grid

#: points of the rule on [0, 1] and on every sub-interval
ADAPTIVE_POINTS = 5
#: sub-intervals of [0, 1] when a layer first needs refining (then halves)
ADAPTIVE_FIRST_SPLIT = 8
#: largest per-neuron error estimate, relative to the largest score
ADAPTIVE_NEURON_TOLERANCE = 0.01
#: a completeness gap below this share of P(target) counts as met whatever the layer's effect: a
#: float32 sum of the scores does not resolve less (on SmolLM2 a layer with an effect of 7e-5 kept
#: a gap of 8e-7 through 52 intervals)
ADAPTIVE_GAP_SLACK = 1e-4


@dataclass
class _Interval:
    lo: float
    hi: float
    value: torch.Tensor  # [d_mlp] float64: the rule's IG on [lo, hi]
    open: bool = True  # its error is not known to be small: split it next round
    error: float = 0.0  # the largest per-neuron error estimate of the split that made it


@dataclass
class LayerRefinement:
    """What ``steps="adaptive"`` did for one layer."""

    intervals: list[_Interval]
    evaluations: int = 0  # points evaluated, the first rung's included
    capped: bool = False

    @property
    def value(self) -> torch.Tensor:
        return torch.stack([iv.value for iv in self.intervals]).sum(0)

    @property
    def points(self) -> int:
        """Points of the final composite rule."""
        return ADAPTIVE_POINTS * len(self.intervals)


def rule_on(grid: str, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``grid``'s ``ADAPTIVE_POINTS`` points and weights mapped to [lo, hi] (float64)."""
    alphas, weights = _base_rule(grid)
    return lo + (hi - lo) * alphas, (hi - lo) * weights


@functools.cache
def _base_rule(grid: str) -> tuple[torch.Tensor, torch.Tensor]:
    alphas, weights = integration_grid(grid, ADAPTIVE_POINTS)
    return alphas, (torch.full_like(alphas, 1 / ADAPTIVE_POINTS) if weights is None else weights)


def refine(first: dict[int, torch.Tensor], pending: list[int], gradients, activations: torch.Tensor, grid: str,
           gap_ok, neuron_tolerance: float, max_steps: int, bar) -> dict[int, LayerRefinement]:
    """Refine the ``pending`` layers, whose one-interval values ``first[layer]`` failed ``gap_ok``.

    ``first``: every attributed layer's scores on [0, 1] ([d_mlp]; the largest score is taken
    over all of them); ``gradients``: ``EngineRun.gradients``; ``gap_ok(layer, value) -> bool``:
    the completeness test; ``max_steps``: the most points a layer may evaluate, the first rung's
    included (then it stops with the estimate it has, ``capped``).
    """
    state = {layer: LayerRefinement([_Interval(0.0, 1.0, first[layer].double())], evaluations=ADAPTIVE_POINTS)
             for layer in pending}
    settled = [first[layer].abs().max().item() for layer in first if layer not in state]

    def largest() -> float:
        return max(settled + [s.value.abs().max().item() for s in state.values()], default=0.0)

    active = list(pending)
    while active:
        plan = {}  # layer -> [(interval, [(piece, its two halves)])]
        for layer in active:
            s = state[layer]
            splits = [(iv, _pieces(iv.lo, iv.hi, ADAPTIVE_FIRST_SPLIT if (iv.lo, iv.hi) == (0.0, 1.0) else 2))
                      for iv in s.intervals if iv.open]
            cost = sum(3 * len(pieces) * ADAPTIVE_POINTS for _, pieces in splits)
            if s.evaluations + cost > max_steps:
                s.capped = True
                continue
            plan[layer] = [(iv, [((lo, hi), _pieces(lo, hi, 2)) for lo, hi in pieces]) for iv, pieces in splits]
        if not plan:
            break
        spans = {layer: [span for _, pieces in splits for piece, halves in pieces for span in (piece, *halves)]
                 for layer, splits in plan.items()}
        rules = {layer: [rule_on(grid, lo, hi) for lo, hi in layer_spans] for layer, layer_spans in spans.items()}
        grads = gradients({layer: torch.cat([a for a, _ in r]) for layer, r in rules.items()}, bar)
        for layer, splits in plan.items():
            s, g, a = state[layer], grads[layer].double().cpu(), activations[layer].double().cpu()
            s.evaluations += len(g)
            parts, row = [], 0
            for alphas, weights in rules[layer]:
                parts.append(a * (weights[:, None] * g[row:row + len(alphas)]).sum(0))
                row += len(alphas)
            values = iter(parts)
            replaced, kept = {id(iv) for iv, _ in splits}, []
            for _, pieces in splits:
                for _, halves in pieces:
                    whole, left, right = next(values), next(values), next(values)
                    err = (whole - left - right).abs().max().item()  # the piece's error estimate; its halves are kept
                    kept += [_Interval(lo, hi, v, error=err) for (lo, hi), v in zip(halves, (left, right))]
            s.intervals = sorted([iv for iv in s.intervals if id(iv) not in replaced] + kept, key=lambda iv: iv.lo)
        scale = largest()
        active = []
        for layer in plan:
            s = state[layer]
            for iv in s.intervals:
                if iv.open and iv.error <= neuron_tolerance * scale:
                    iv.open = False
            if not any(iv.open for iv in s.intervals) and not gap_ok(layer, s.value):
                # every estimate is small and the sum still misses: split where the estimates were largest
                max(s.intervals, key=lambda iv: iv.error / (iv.hi - iv.lo)).open = True
            if any(iv.open for iv in s.intervals):
                active.append(layer)
    return state


def _pieces(lo: float, hi: float, n: int) -> list[tuple[float, float]]:
    return [(lo + (hi - lo) * k / n, lo + (hi - lo) * (k + 1) / n) for k in range(n)]
