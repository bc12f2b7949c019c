"""The default engine as a fallback policy: the stepper where it verifies, else the cached engine,
else the batched engine."""

from __future__ import annotations

from kn_plugin.attribution.engines.base import AttributionEngine
from kn_plugin.attribution.engines.cached import CachedEngine
from kn_plugin.attribution.engines.stepper import StepperEngine
from kn_plugin.attribution.engines.verified import run_chain


class FastEngine(AttributionEngine):
    """The default: the hand-written stepper where it verifies, else the model-agnostic cached
    engine (causal LMs), else the batched engine; ``AttributionResult.engine`` says which ran."""

    name = "fast"

    def __init__(self):
        self.candidates = (StepperEngine(), CachedEngine())  # made once, tried in this order on every fact

    def run(self, model, fact, layers, activations, config, bar, clean_logp=None):
        return run_chain(self.candidates, model, fact, layers, activations, config, bar, clean_logp)
