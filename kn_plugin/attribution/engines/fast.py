"""The default engine as a fallback policy: the stepper where it verifies, else the cached engine,
else the batched engine."""

from __future__ import annotations

from kn_plugin.attribution.config import PASS_ROWS
from kn_plugin.attribution.engines.base import AttributionEngine
from kn_plugin.attribution.engines.cached import CachedEngine
from kn_plugin.attribution.engines.stepper import StepperEngine
from kn_plugin.attribution.engines.verified import run_chain


class FastEngine(AttributionEngine):
    """The default: the hand-written stepper where it verifies, else the model-agnostic cached
    engine (causal LMs), else the batched engine; ``AttributionResult.engine`` says which ran."""

    name = "fast"
    pass_rows = PASS_ROWS

    def __init__(self):
        self.candidates = (StepperEngine(), CachedEngine())  # made once, tried in this order on every fact

    def capture(self, model):
        """What the candidates that apply reuse from the clean pass (None: none of them does)."""
        wanted = [c.capture(model) for c in self.candidates if c.applicable(model)]
        wanted = [paths for paths in wanted if paths is not None]
        return tuple(dict.fromkeys(p for paths in wanted for p in paths)) if wanted else None

    def run(self, model, fact, layers, activations, config, bar, clean=None):
        return run_chain(self.candidates, model, fact, layers, activations, config, bar, clean)
