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

from kn_plugin.assess import EncodedFact, encode_fact, sequence_log_prob, target_log_prob
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
    batch_size: int = 10
    layers: tuple[int, ...] | None = None
    progress: bool = True
    #: fast engine: how many layers share one batched pass (None: all of them)
    layers_per_pass: int | None = None

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

    def run(self, model: LoadedModel, fact: EncodedFact, layers: tuple[int, ...],
            activations: torch.Tensor, config: IGConfig, bar: tqdm) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores [len(layers), d_mlp] and P(target) with each layer zeroed ([n_layers])."""
        return (self.layer_scores(model, fact, layers, activations, config, bar),
                zeroed_probs(model, fact, layers))

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


@dataclass
class _CleanStates:
    """Per-layer states of the clean pass computed by the family's fast stepper."""

    mids: list[torch.Tensor]  # [1, seq, ...] what ``post`` needs besides the activation
    acts: list[torch.Tensor]  # [1, seq, d_mlp]
    kvs: list  # per layer (k, v) [1, heads, seq, head_dim], or None (bidirectional models)


class FastEngine(AttributionEngine):
    """Same IG as :class:`BatchedEngine`, without recomputing what the patch cannot change.

    Scaling layer ``l``'s activation at the prediction position leaves everything below layer
    ``l`` unchanged, and in a causal model every earlier position too. The engine runs one
    clean pass, keeps each layer's residual state, activation and keys/values, and then, for
    each layer and batch of alpha steps, recomputes only layers ``l..L-1`` and (causal models)
    only the positions from the prediction position on, attending to the cached keys and
    values. The LM head is applied only where targets are scored. Models whose adapter has no
    stepper, or whose stepper does not reproduce the clean activations, use the batched engine.
    """

    name = "fast"

    def __init__(self, tolerance: float = 1e-4):
        self.tolerance = tolerance

    @torch.no_grad()
    def clean_states(self, stepper, fact: EncodedFact, n_layers: int) -> _CleanStates:
        h = stepper.embed(fact.input_ids)
        mids, acts, kvs = [], [], []
        for layer in range(n_layers):
            mid, act, kv = stepper.pre(layer, h, None, 0)
            mids.append(mid)
            acts.append(act)
            kvs.append(kv)
            h = stepper.post(layer, act, mid)
        return _CleanStates(mids, acts, kvs)

    def layer_scores(self, model, fact, layers, activations, config, bar):
        return self.run(model, fact, layers, activations, config, bar)[0]

    def _prepare(self, model: LoadedModel, fact: EncodedFact, activations: torch.Tensor):
        stepper = model.adapter.fast_stepper()
        if stepper is None:
            return None
        clean = self.clean_states(stepper, fact, model.n_layers)
        mine = torch.stack([a[0, fact.pred_pos] for a in clean.acts])
        err = (mine - activations).abs().max().item()
        if err > self.tolerance * max(1.0, activations.abs().max().item()):
            logger.warning("fast engine does not reproduce %s (error %.2g): using the batched engine",
                           model.name, err)
            return None
        return stepper, clean

    def run(self, model, fact, layers, activations, config, bar):
        prepared = self._prepare(model, fact, activations)
        if prepared is None:
            return BatchedEngine().run(model, fact, layers, activations, config, bar)
        stepper, clean = prepared
        start = fact.pred_pos if stepper.causal else 0
        alphas = riemann_alphas(config.steps).to(activations.dtype).to(activations.device)
        grad_sum = {layer: torch.zeros_like(activations[layer]) for layer in layers}
        zeroed = torch.zeros(model.n_layers, dtype=torch.float64)
        for group in _layer_groups(layers, config.layers_per_pass):
            with torch.no_grad():  # completeness check: alpha = 0, one row per layer
                logp, _ = self._staircase(stepper, clean, fact, group, activations,
                                          alphas.new_zeros(1), start)
            zeroed[list(group)] = logp.exp().double().cpu()
            for chunk in alphas.split(config.batch_size):
                with torch.enable_grad():
                    logp, leaves = self._staircase(stepper, clean, fact, group, activations, chunk,
                                                   start)
                    grads = torch.autograd.grad(logp.exp().sum(), leaves)
                for layer, g in zip(group, grads):
                    grad_sum[layer] += g.sum(0)
                bar.update(len(chunk) * len(group))
        scores = torch.stack([activations[layer] * grad_sum[layer] / config.steps for layer in layers])
        return scores, zeroed

    @staticmethod
    def _staircase(stepper, clean: _CleanStates, fact: EncodedFact, layers: tuple[int, ...],
                   activations: torch.Tensor, alphas: torch.Tensor, start: int):
        """log P(target) for every (layer, alpha) row in one batched pass, and the leaves.

        ``layers`` is sorted; rows come layer by layer, ``len(alphas)`` rows each. Walking up
        the stack, the rows of layer ``j`` join at the second half of layer ``j`` (with the
        patched activation ``alpha * a`` as a leaf tensor), while the rows already in flight run
        layer ``j`` in full, against the clean keys/values of the positions before ``start``.
        """
        b, p, n_layers = len(alphas), fact.pred_pos - start, len(clean.acts)
        leaves = []
        h = None
        for j in range(layers[0], n_layers):
            if h is not None:
                past = None
                if stepper.causal:
                    k, v = clean.kvs[j]
                    past = (k[:, :, :start], v[:, :, :start])
                mid, act, _ = stepper.pre(j, h, past, start)
                h = stepper.post(j, act, mid)
            if j in layers:
                x = alphas[:, None] * activations[j][None]  # [b, d_mlp]
                if torch.is_grad_enabled():
                    x.requires_grad_(True)
                leaves.append(x)
                act = clean.acts[j][:, start:].expand(b, -1, -1)
                act = torch.cat([act[:, :p], x[:, None], act[:, p + 1:]], 1)
                new = stepper.post(j, act, clean.mids[j][:, start:].expand(b, -1, -1))
                h = new if h is None else torch.cat([h, new], 0)
        rel = torch.tensor(fact.score_positions, device=h.device) - start
        unembed = stepper.unembedding()
        if unembed is None:
            return sequence_log_prob(stepper.logits(h[:, rel]), fact.target_ids), leaves
        norm, weight, bias = unembed
        x = norm(h[:, rel])  # [rows, n_tgt, d_model]
        rows, n_tgt, d = x.shape
        tgt = torch.tensor(fact.target_ids, device=x.device).repeat(rows)
        logp = _TargetLogProb.apply(x.reshape(rows * n_tgt, d), weight, bias, tgt)
        return logp.view(rows, n_tgt).sum(-1), leaves


class _TargetLogProb(torch.autograd.Function):
    """log softmax(x @ W.T + b)[target] per row, with a lean backward.

    Autograd's log_softmax + gather keeps several [rows, vocab] tensors; this keeps only the
    log-probabilities and turns them into the gradient in place: d/dx = g * (W[t] - softmax @ W).
    Gradients flow to ``x`` only (the weights are frozen).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, target):
        logp = torch.log_softmax(torch.nn.functional.linear(x, weight, bias), dim=-1)
        ctx.save_for_backward(weight, logp, target)
        return logp.gather(1, target[:, None]).squeeze(1)

    @staticmethod
    def backward(ctx, grad):
        weight, logp, target = ctx.saved_tensors
        dz = logp.exp_().mul_(-grad[:, None])  # -g * softmax, in place
        dz.scatter_add_(1, target[:, None], grad[:, None])  # + g * onehot(target)
        return dz @ weight, None, None, None


def _layer_groups(layers: tuple[int, ...], size: int | None) -> list[tuple[int, ...]]:
    ordered = tuple(sorted(layers))
    size = size or len(ordered)
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


ENGINES: dict[str, type[AttributionEngine]] = {
    "fast": FastEngine, "batched": BatchedEngine, "captum": CaptumEngine,
}
DEFAULT_ENGINE = "fast"


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
        batch_size: int = 10, progress: bool = True, layers_per_pass: int | None = None,
    ) -> AttributionResult:
        """IG scores of every neuron of the chosen layers (default: all) for one fact.

        ``batch_size`` alpha steps per pass; the fast engine also batches ``layers_per_pass``
        layers together (default: all; lower it to save memory on large models).
        """
        config = IGConfig(steps=steps, batch_size=batch_size,
                          layers=tuple(layers) if layers is not None else None, progress=progress,
                          layers_per_pass=layers_per_pass)
        model = self.model
        fact = encode_fact(model, prompt, target)
        chosen = config.layers if config.layers is not None else tuple(range(model.n_layers))
        for layer in chosen:
            model.adapter.check_layer(layer)
        activations, prob = clean_pass(model, fact)
        scores = torch.zeros_like(activations)
        with tqdm(total=len(chosen) * config.steps, disable=not config.progress,
                  desc=f"IG {prompt[:30]!r}", unit="step", leave=False) as bar:
            zeroed = torch.zeros(model.n_layers, dtype=torch.float64)
            if chosen:
                layer_scores, zeroed = self.engine.run(model, fact, chosen, activations, config, bar)
                scores[list(chosen)] = layer_scores.to(scores.dtype)
        return AttributionResult(
            model=model.name, prompt=prompt, target=target, scores=scores.cpu(),
            activations=activations.cpu(), target_prob=prob,
            zeroed_prob=zeroed, layers=chosen, steps=config.steps,
            engine=self.engine.name,
        )
