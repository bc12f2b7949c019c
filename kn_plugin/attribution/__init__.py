"""Knowledge attribution: Integrated Gradients over FFN neurons, exactly as Dai et al. (2021).

For layer ``l`` with clean activation ``a`` ([d_mlp]) at the prediction position, and the
probability ``P(alpha) = P(target | activation at that position = alpha * a)``, the score of
neuron ``i`` is the right Riemann sum of IG from the zero baseline::

    score_i = a_i / m * sum_{k=1..m} dP/da_i (k/m * a)

(the grid ``alpha = 1/m, 2/m, ..., 1``, Captum's ``riemann_right``). Every position other than
the prediction position, and every other layer, is left untouched. By completeness,
``sum_i score_i`` approaches ``P(1) - P(0)``; each result reports that gap per layer.

Several engines compute the same numbers (see :data:`ENGINES`); the API does not change with
the engine.
"""

from kn_plugin.attribution.adaptive import ADAPTIVE_NEURON_TOLERANCE
from kn_plugin.attribution.config import (
    DEFAULT_BATCH_SIZE,
    MATMUL_DTYPES,
    MIXED_TOLERANCE,
    PASS_ROWS,
    AttributionResult,
    EngineRun,
    IGConfig,
    layer_effect_floor,
    relative_gaps,
    worst_relative_gap,
)
from kn_plugin.attribution.core import KnowledgeAttribution
from kn_plugin.attribution.engines.base import (
    FP16_MIN_PROB,
    VERIFY_TOLERANCE,
    AttributionEngine,
    EngineFailure,
    KnowledgeNeuronWarning,
    clean_pass,
    zeroed_log_probs,
    zeroed_probs,
)
from kn_plugin.attribution.engines.batched import PROMPT_BATCH_ENGINE, BatchedEngine, prompt_batch_scores
from kn_plugin.attribution.engines.cached import CachedEngine
from kn_plugin.attribution.engines.captum import CaptumEngine
from kn_plugin.attribution.engines.fast import FastEngine
from kn_plugin.attribution.engines.registry import DEFAULT_ENGINE, ENGINES, get_engine
from kn_plugin.attribution.engines.stepper import StepperEngine
from kn_plugin.attribution.engines.verified import VerifiedEngine, run_chain
from kn_plugin.attribution.grid import (
    AUTO_MAX_STEPS,
    AUTO_STEPS,
    AUTO_TOLERANCE,
    CONVERGED,
    DEFAULT_GRID,
    GRIDS,
    STEP_RULES,
    check_grid,
    integration_grid,
    riemann_alphas,
)
from kn_plugin.defaults import PAPER_STEPS

__all__ = [
    "ADAPTIVE_NEURON_TOLERANCE", "AUTO_MAX_STEPS", "AUTO_STEPS", "PAPER_STEPS", "AUTO_TOLERANCE",
    "AttributionEngine", "AttributionResult", "BatchedEngine", "CONVERGED", "CachedEngine", "CaptumEngine",
    "DEFAULT_BATCH_SIZE", "DEFAULT_ENGINE", "DEFAULT_GRID", "ENGINES", "EngineFailure", "EngineRun", "FP16_MIN_PROB",
    "FastEngine", "GRIDS", "IGConfig", "KnowledgeAttribution", "KnowledgeNeuronWarning", "MATMUL_DTYPES",
    "MIXED_TOLERANCE", "PASS_ROWS", "PROMPT_BATCH_ENGINE", "STEP_RULES", "StepperEngine", "VERIFY_TOLERANCE",
    "VerifiedEngine", "check_grid", "clean_pass", "get_engine", "integration_grid", "layer_effect_floor",
    "prompt_batch_scores", "relative_gaps", "riemann_alphas", "run_chain", "worst_relative_gap", "zeroed_log_probs",
    "zeroed_probs",
]
