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

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from kn_plugin.assess import EncodedFact, encode_fact, target_log_prob
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.models import LoadedModel

logger = logging.getLogger(__name__)


def riemann_alphas(steps: int) -> torch.Tensor:
    """The paper's grid ``k/m`` for ``k = 1..m`` (weights ``1/m`` each)."""
    return torch.arange(1, steps + 1, dtype=torch.float64) / steps


@dataclass(frozen=True)
class IGConfig:
    """Checked settings for knowledge attribution."""

    steps: int = 20
    batch_size: int = 20
    layers: tuple[int, ...] | None = None
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise KnowledgeNeuronError(f"steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise KnowledgeNeuronError(
                f"batch_size must be a positive integer, got {self.batch_size!r}"
            )


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
        }


class AttributionEngine(ABC):
    """Computes IG scores for chosen layers. Engines must agree to numerical precision."""

    name: str = "abstract"

    @abstractmethod
    def layer_scores(
        self, model: LoadedModel, fact: EncodedFact, layers: tuple[int, ...], activations: torch.Tensor,
        config: IGConfig, bar: tqdm,
    ) -> torch.Tensor:
        """Return [len(layers), d_mlp] scores; ``activations`` is the clean [n_layers, d_mlp]."""

    def supports(self, model: LoadedModel) -> bool:
        return True


def clean_pass(model: LoadedModel, fact: EncodedFact) -> tuple[torch.Tensor, float]:
    """Activations at the prediction position for every layer ([n_layers, d_mlp]) and P(target)."""
    acts: dict[int, torch.Tensor] = {}
    handles = []

    def grab(layer):
        def fn(act):
            acts[layer] = act[0, fact.pred_pos].detach().clone()
            return act

        return fn

    try:
        for layer in range(model.n_layers):
            handles.append(model.adapter.patch_site(layer, grab(layer)))
        with torch.no_grad():
            logits = model.hf_model(fact.input_ids).logits
    finally:
        for h in handles:
            h.remove()
    prob = target_log_prob(logits, fact).exp()[0].item()
    return torch.stack([acts[i] for i in range(model.n_layers)]), prob


def zeroed_probs(model: LoadedModel, fact: EncodedFact, layers: tuple[int, ...]) -> torch.Tensor:
    """P(target) with layer ``layers[r]`` zeroed at the prediction position, one batched pass."""
    out = torch.zeros(model.n_layers, dtype=torch.float64)
    if not layers:
        return out
    handles = []

    def zero_row(row):
        def fn(act):
            act = act.clone()
            act[row, fact.pred_pos] = 0
            return act

        return fn

    try:
        for row, layer in enumerate(layers):
            handles.append(model.adapter.patch_site(layer, zero_row(row)))
        with torch.no_grad():
            logits = model.hf_model(fact.input_ids.expand(len(layers), -1)).logits
    finally:
        for h in handles:
            h.remove()
    out[list(layers)] = target_log_prob(logits, fact).exp().double().cpu()
    return out


class BatchedEngine(AttributionEngine):
    """Reference engine: full forward/backward passes, ``batch_size`` alpha steps per pass."""

    name = "batched"

    def layer_scores(self, model, fact, layers, activations, config, bar):
        alphas = riemann_alphas(config.steps).to(activations.dtype).to(activations.device)
        out = []
        for layer in layers:
            a = activations[layer]
            grad_sum = torch.zeros_like(a)
            for chunk in alphas.split(config.batch_size):
                x = (chunk[:, None] * a[None]).requires_grad_(True)  # [b, d_mlp]

                def patch(act, x=x):
                    act = act.clone()
                    act[:, fact.pred_pos] = x
                    return act

                handle = model.adapter.patch_site(layer, patch)
                try:
                    with torch.enable_grad():
                        logits = model.hf_model(fact.input_ids.expand(len(chunk), -1)).logits
                        prob = target_log_prob(logits, fact).exp().sum()
                        (grad,) = torch.autograd.grad(prob, x)
                finally:
                    handle.remove()
                grad_sum += grad.sum(0)
                bar.update(len(chunk))
            out.append(a * grad_sum / config.steps)
        return torch.stack(out)


class CaptumEngine(AttributionEngine):
    """Captum's ``LayerIntegratedGradients`` on the adapter's per-layer target."""

    name = "captum"

    def layer_scores(self, model, fact, layers, activations, config, bar):
        from captum.attr import LayerIntegratedGradients

        from kn_plugin.adapters.captum import captum_target

        out = []
        for layer in layers:
            target = captum_target(model, fact.prompt, fact.target, layer)
            lig = LayerIntegratedGradients(target.forward_func, target.layer)
            attr = lig.attribute(
                target.inputs, baselines=target.baselines, n_steps=config.steps,
                method="riemann_right", internal_batch_size=config.batch_size,
            )
            out.append(attr[0].detach())
            bar.update(config.steps)
        return torch.stack(out)


ENGINES: dict[str, type[AttributionEngine]] = {"batched": BatchedEngine, "captum": CaptumEngine}
DEFAULT_ENGINE = "batched"


def get_engine(engine: str | AttributionEngine) -> AttributionEngine:
    if isinstance(engine, AttributionEngine):
        return engine
    if engine not in ENGINES:
        raise KnowledgeNeuronError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    return ENGINES[engine]()


class KnowledgeAttribution:
    """Integrated Gradients over FFN neurons, one layer at a time (Captum-style ``attribute``).

    >>> ka = KnowledgeAttribution(load_model("tiny-llama"))
    >>> res = ka.attribute("The capital of France is", " Paris")
    >>> res.scores.shape   # [n_layers, d_mlp]
    """

    def __init__(self, model: LoadedModel, engine: str | AttributionEngine = DEFAULT_ENGINE):
        self.model = model
        self.engine = get_engine(engine)
        if not self.engine.supports(model):
            raise KnowledgeNeuronError(
                f"engine {self.engine.name!r} does not support {model.adapter.family} models"
            )

    def attribute(
        self, prompt: str, target: str, steps: int = 20, layers: list[int] | None = None,
        batch_size: int = 20, progress: bool = True,
    ) -> AttributionResult:
        config = IGConfig(steps=steps, batch_size=batch_size,
                          layers=tuple(layers) if layers is not None else None, progress=progress)
        model = self.model
        fact = encode_fact(model, prompt, target)
        chosen = config.layers if config.layers is not None else tuple(range(model.n_layers))
        for layer in chosen:
            model.adapter.check_layer(layer)
        activations, prob = clean_pass(model, fact)
        scores = torch.zeros_like(activations)
        with tqdm(total=len(chosen) * config.steps, disable=not config.progress,
                  desc=f"IG {prompt[:30]!r}", unit="step", leave=False) as bar:
            if chosen:
                scores[list(chosen)] = self.engine.layer_scores(
                    model, fact, chosen, activations, config, bar
                ).to(scores.dtype)
        return AttributionResult(
            model=model.name, prompt=prompt, target=target, scores=scores.cpu(),
            activations=activations.cpu(), target_prob=prob,
            zeroed_prob=zeroed_probs(model, fact, chosen), layers=chosen, steps=config.steps,
            engine=self.engine.name,
        )
