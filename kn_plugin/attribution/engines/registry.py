"""Engines by name."""

from __future__ import annotations

from kn_plugin.attribution.engines.base import AttributionEngine
from kn_plugin.attribution.engines.batched import BatchedEngine
from kn_plugin.attribution.engines.cached import CachedEngine
from kn_plugin.attribution.engines.captum import CaptumEngine
from kn_plugin.attribution.engines.fast import FastEngine
from kn_plugin.attribution.engines.stepper import StepperEngine
from kn_plugin.errors import KnowledgeNeuronError

ENGINES: dict[str, type[AttributionEngine]] = {
    "fast": FastEngine, "stepper": StepperEngine, "cached": CachedEngine, "batched": BatchedEngine,
    "captum": CaptumEngine,
}


DEFAULT_ENGINE = "fast"


def get_engine(engine: str | AttributionEngine) -> AttributionEngine:
    if isinstance(engine, AttributionEngine):
        return engine
    if not isinstance(engine, str) or engine not in ENGINES:
        raise KnowledgeNeuronError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    return ENGINES[engine]()
