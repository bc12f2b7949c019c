"""What an attribution is asked for (:class:`IGConfig`) and what it returns (:class:`AttributionResult`),
with the completeness gaps that say how well each layer's integral converged."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kn_plugin.attribution.grid import DEFAULT_GRID, check_grid
from kn_plugin.defaults import PAPER_STEPS
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.validation import MAX_STEPS, positive_int

#: alpha steps per pass when the caller gives none, on engines that run one layer per pass
DEFAULT_BATCH_SIZE = 10
#: (layer, alpha) rows per pass the fast engines fill when the caller gives no batch size: the
#: paper's m = 20 of a 30-layer model in one pass (larger products run nearer the machine's peak)
PASS_ROWS = 640


def default_batch_size(pass_rows: int | None, steps, layers_in_pass: int) -> int:
    """Alpha steps per pass for a caller who gave none: :data:`DEFAULT_BATCH_SIZE` on engines
    without a row budget (``pass_rows`` None); else passes of at most ``pass_rows`` rows of
    ``layers_in_pass`` layers each, as even as ``steps`` (an int; else the rule's points vary)
    allows: m = 50 of 30 layers in three passes of 17, 17 and 16 steps, not 21, 21 and 8."""
    if pass_rows is None:
        return DEFAULT_BATCH_SIZE
    per_pass = max(1, pass_rows // max(1, layers_in_pass))
    if type(steps) is int and steps > 0:
        passes = -(-steps // per_pass)
        return -(-steps // passes)
    return per_pass


#: the low-precision dtypes the fast engines can run their matrix products in
MATMUL_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}

#: largest |log P(target)| difference from the model's own forward a mixed-precision engine may
#: show (the layers' products rounded to 8 or 11 mantissa bits)
MIXED_TOLERANCE = {torch.bfloat16: 0.1, torch.float16: 0.02}


@dataclass(frozen=True)
class IGConfig:
    """Checked settings for knowledge attribution."""

    steps: int = PAPER_STEPS
    batch_size: int = DEFAULT_BATCH_SIZE
    layers: tuple[int, ...] | None = None
    progress: bool = True
    #: fast engine: how many layers share one batched pass (None: all of them)
    layers_per_pass: int | None = None
    #: integration rule, one of :data:`GRIDS` (default: the paper's right Riemann sum)
    grid: str = DEFAULT_GRID
    #: fast engines: the dtype of the layers' matrix products (:data:`MATMUL_DTYPES`; None: the
    #: model's dtype). The patched activation, its gradient and the IG sum stay in the model's
    #: dtype (on the stepper the LM head's log-softmax too); the engine checks itself against the model's own
    #: forward at :data:`MIXED_TOLERANCE` and otherwise runs without it, with a warning
    matmul_dtype: torch.dtype | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KnowledgeNeuronError(f"{name} must be a positive integer, got {value!r}")
            if value > MAX_STEPS:
                raise KnowledgeNeuronError(f"{name} must be at most {MAX_STEPS:,}, got {value:,}")
        if self.layers_per_pass is not None:
            positive_int("layers_per_pass", self.layers_per_pass)
        check_grid(self.grid)
        if self.matmul_dtype is not None:
            dtype = MATMUL_DTYPES.get(self.matmul_dtype if isinstance(self.matmul_dtype, str) else None,
                                      self.matmul_dtype)
            if dtype not in MATMUL_DTYPES.values():
                raise KnowledgeNeuronError(f"matmul_dtype must be one of {', '.join(MATMUL_DTYPES)} or None, "
                                           f"got {self.matmul_dtype!r}")
            object.__setattr__(self, "matmul_dtype", dtype)
        if self.grid == "riemann_trapezoid" and self.steps < 2:
            raise KnowledgeNeuronError("the trapezoid rule needs steps >= 2")


@dataclass
class AttributionResult:
    """IG scores of every FFN neuron for one prompt and target.

    ``scores``/``activations``: [n_layers, d_mlp] (rows of layers not attributed are zero);
    ``zeroed_prob``: [n_layers], P(target) with that layer's activation zeroed at the
    prediction position.
    """

    model: str
    prompt: str
    target: str
    scores: torch.Tensor
    activations: torch.Tensor
    target_prob: float
    zeroed_prob: torch.Tensor
    layers: tuple[int, ...]
    steps: int
    engine: str
    extras: dict = field(default_factory=dict)

    @property
    def completeness_gap(self) -> torch.Tensor:
        """[n_layers]: sum of scores minus (P(full) - P(zeroed)); Riemann error with m steps."""
        return self.scores.sum(-1) - (self.target_prob - self.zeroed_prob)

    def to_dict(self) -> dict:
        return {
            "model": self.model, "prompt": self.prompt, "target": self.target,
            "target_prob": self.target_prob, "steps": self.steps, "engine": self.engine,
            "layers": list(self.layers), "zeroed_prob": self.zeroed_prob.tolist(),
            "completeness_gap": self.completeness_gap.tolist(),
            "extras": self.extras,
        }


@dataclass
class EngineRun:
    """What an engine returns: scores [len(layers), d_mlp], P(target) with each layer zeroed
    ([n_layers], from the model's own forward), the engine that actually ran, and notes on the
    paths that were tried first."""

    scores: torch.Tensor
    zeroed: torch.Tensor
    engine: str
    notes: list[str] = field(default_factory=list)
    #: the dtype the engine's layer products ran in (None: the model's own)
    matmul_dtype: torch.dtype | None = None
    #: ``resume(layers, config, bar) -> EngineRun``: the same engine on the same fact with other
    #: settings (``steps="auto"``'s next rung), reusing what this run prepared and verified
    #: (``zeroed`` and the engine's self-check do not depend on the steps); None: run afresh
    resume: Callable[..., EngineRun] | None = field(default=None, repr=False)
    #: ``gradients({layer: alphas}, bar) -> {layer: [len(alphas), d_mlp]}``: dP(target)/dx at
    #: ``x = alpha * a`` for explicit points per layer (``steps="adaptive"``), reusing what this run
    #: prepared and verified; None: the engine does not give them
    gradients: Callable[..., dict] | None = field(default=None, repr=False)


def layer_effect_floor(result: AttributionResult) -> float:
    """1e-3 of the largest layer effect |P(full) - P(zeroed)| (layers that hardly matter do not block)."""
    layers = list(result.layers)
    effect = (result.target_prob - result.zeroed_prob[layers]).abs()
    return max(effect.max().item() * 1e-3, 1e-12) if layers else 1e-12


def relative_gaps(result: AttributionResult, floor: float) -> dict[int, float]:
    """Per attributed layer: |completeness gap| / max(|P(full) - P(zeroed)|, floor)."""
    gap, effect = result.completeness_gap.abs(), (result.target_prob - result.zeroed_prob).abs()
    return {layer: (gap[layer] / max(effect[layer].item(), floor)).item() for layer in result.layers}


def worst_relative_gap(result: AttributionResult) -> float:
    """max over attributed layers of |completeness gap| / max(|P(full) - P(zeroed)|, floor), the
    floor being 1e-3 of the largest layer effect (layers that hardly matter do not block)."""
    return max(relative_gaps(result, layer_effect_floor(result)).values(), default=0.0)
