"""Integration rules of Integrated Gradients: the paper's right Riemann sum and Captum's other rules,
and the settings of converged attributions."""

from __future__ import annotations

import torch

from kn_plugin.errors import KnowledgeNeuronError


def riemann_alphas(steps: int) -> torch.Tensor:
    """The paper's grid ``k/m`` for ``k = 1..m`` (weights ``1/m`` each)."""
    return torch.arange(1, steps + 1, dtype=torch.float64) / steps


#: the m values ``steps="auto"`` tries, in order (then the cap), and its defaults
AUTO_STEPS = (5, 10, 20, 50, 100, 200, 500)


AUTO_TOLERANCE = 0.01


AUTO_MAX_STEPS = 500


#: ``steps`` values other than a number: "auto" (each layer the smallest m of :data:`AUTO_STEPS`
#: whose completeness gap meets the tolerance) and "adaptive" (:mod:`kn_plugin.attribution.adaptive`:
#: a composite rule bisected where a layer's path needs it, with per-neuron error estimates)
STEP_RULES = ("auto", "adaptive")


#: converged attributions (``locate(..., **CONVERGED)``, ``kn locate --converged``): Gauss-Legendre
#: with steps="adaptive". A completeness gap can be met while single neurons are still far off
#: (SmolLM2's layer 0, whose path has a sharp step: "auto" accepted it at m = 10 with the largest
#: neuron's score half wrong); the adaptive rule also bounds each neuron's error estimate.
CONVERGED = {"steps": "adaptive", "grid": "gausslegendre"}


#: Captum's integration rules (``LayerIntegratedGradients.attribute(method=...)``)
GRIDS = ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre")


DEFAULT_GRID = "riemann_right"


def check_grid(grid: str) -> str:
    if not isinstance(grid, str) or grid not in GRIDS:
        raise KnowledgeNeuronError(f"unknown grid {grid!r}: choose one of {', '.join(GRIDS)}")
    return grid


#: the one-step Riemann rules: the point each evaluates at
_ONE_POINT = {"riemann_right": 1.0, "riemann_left": 0.0, "riemann_middle": 0.5}


def integration_grid(grid: str, steps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(alphas, weights)`` of an integration rule with ``steps`` points, from Captum's own
    ``approximation_parameters``; ``weights`` is None when every weight is ``1/steps`` (the
    Riemann rules), so that those scores are ``a * sum(grad) / steps`` exactly as before."""
    from captum.attr._utils.approximation_methods import approximation_parameters

    check_grid(grid)
    if steps == 1 and grid in _ONE_POINT:  # Captum's Riemann rules assert n > 1; the one-point rule is plain
        return torch.tensor([_ONE_POINT[grid]], dtype=torch.float64), None
    step_sizes, alphas = approximation_parameters(grid)
    a = torch.tensor(alphas(steps), dtype=torch.float64)
    w = torch.tensor(step_sizes(steps), dtype=torch.float64)
    if grid == "riemann_right":  # the paper's formula, bit for bit
        a = riemann_alphas(steps)
    return a, (None if bool((w == 1 / steps).all()) else w)
