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

import copy
import logging
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from kn_plugin.assess import EncodedFact, encode_fact, sequence_log_prob, target_log_prob
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.models import LoadedModel, wrap
from kn_plugin.validation import MAX_STEPS, finite, positive_int

logger = logging.getLogger(__name__)


def riemann_alphas(steps: int) -> torch.Tensor:
    """The paper's grid ``k/m`` for ``k = 1..m`` (weights ``1/m`` each)."""
    return torch.arange(1, steps + 1, dtype=torch.float64) / steps


#: the m values ``steps="auto"`` tries, in order (then the cap), and its defaults
AUTO_STEPS = (5, 10, 20, 50, 100, 200, 500)
AUTO_TOLERANCE = 0.01
AUTO_MAX_STEPS = 500
#: converged attributions (``locate(..., **CONVERGED)``, ``kn locate --converged``): Gauss-Legendre
#: points with steps="auto", each layer to its own m. On SmolLM2 ("The capital of France is")
#: 29 of 30 layers meet the 1% gap at m = 5 and layer 0 at m = 50: 230 layer-steps against the
#: paper's 600 at m = 20, with the coarse set of Gauss-Legendre at m = 100.
CONVERGED = {"steps": "auto", "grid": "gausslegendre"}

#: Captum's integration rules (``LayerIntegratedGradients.attribute(method=...)``)
GRIDS = ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre")
DEFAULT_GRID = "riemann_right"


def check_grid(grid: str) -> str:
    if not isinstance(grid, str) or grid not in GRIDS:
        raise KnowledgeNeuronError(f"unknown grid {grid!r}: choose one of {', '.join(GRIDS)}")
    return grid


#: the one-step Riemann rules: the point each evaluates at
_ONE_POINT = {"riemann_right": 1.0, "riemann_left": 0.0, "riemann_middle": 0.5}


#: float16's smallest normal number: an IG integrand dP/da of a target below it underflows
FP16_MIN_PROB = 2.0 ** -14


def _check_representable(model: LoadedModel, fact: EncodedFact, logp: torch.Tensor) -> None:
    """In float16 the gradient of a probability below the smallest normal number flushes to zero
    (every score 0, no neuron): refuse before computing instead of returning it."""
    prob = logp.exp()[0].item()
    if model.dtype == torch.float16 and prob < FP16_MIN_PROB:
        raise KnowledgeNeuronError(
            f"P({fact.target!r} | {fact.prompt[:40]!r}) = {prob:.2g} is below float16's smallest normal number "
            f"({FP16_MIN_PROB:.2g}): its integrated gradients underflow to zero; load the model in float32 or bfloat16")


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


@dataclass(frozen=True)
class IGConfig:
    """Checked settings for knowledge attribution."""

    steps: int = 20
    batch_size: int = 10
    layers: tuple[int, ...] | None = None
    progress: bool = True
    #: fast engine: how many layers share one batched pass (None: all of them)
    layers_per_pass: int | None = None
    #: integration rule, one of :data:`GRIDS` (default: the paper's right Riemann sum)
    grid: str = DEFAULT_GRID

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


class EngineFailure(RuntimeError):
    """A shortcut engine failed on a fact: ``mismatch`` when it disagreed with the model."""

    def __init__(self, message: str, mismatch: bool = False):
        super().__init__(message)
        self.mismatch = mismatch


class AttributionEngine(ABC):
    """Computes IG scores for chosen layers. Engines must agree to numerical precision."""

    name: str = "abstract"

    @abstractmethod
    def run(self, model: LoadedModel, fact: EncodedFact, layers: tuple[int, ...], activations: torch.Tensor,
            config: IGConfig, bar: tqdm, clean_logp: torch.Tensor | None = None) -> EngineRun:
        """``activations`` is the clean [n_layers, d_mlp] at the prediction position and
        ``clean_logp`` the clean log P(target) ([1]), both from the model's own forward."""


def _clean(model: LoadedModel, fact: EncodedFact) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations at the prediction position of every layer ([n_layers, d_mlp]) and log P(target)
    ([1]), from one forward of the model."""
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
    return torch.stack([acts[i] for i in range(model.n_layers)]), target_log_prob(logits, fact)


def clean_pass(model: LoadedModel, fact: EncodedFact) -> tuple[torch.Tensor, float]:
    """Activations at the prediction position for every layer ([n_layers, d_mlp]) and P(target)."""
    acts, logp = _clean(model, fact)
    return acts, logp.exp()[0].item()


def zeroed_log_probs(model: LoadedModel, fact: EncodedFact, layers: tuple[int, ...]) -> torch.Tensor:
    """[len(layers)] log P(target) with layer ``layers[r]`` zeroed at the prediction position,
    computed by the model's own forward in one batched pass."""
    if not layers:
        return torch.zeros(0, dtype=torch.float64)
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
    return target_log_prob(logits, fact).double().cpu()


def zeroed_probs(model: LoadedModel, fact: EncodedFact, layers: tuple[int, ...]) -> torch.Tensor:
    """[n_layers]: P(target) with each of ``layers`` zeroed at the prediction position (others 0)."""
    out = torch.zeros(model.n_layers, dtype=torch.float64)
    if layers:
        out[list(layers)] = zeroed_log_probs(model, fact, layers).exp()
    return out


def _grid(config: IGConfig, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rule's alphas (in the activation dtype) and weights (float32, or None: uniform)."""
    alphas, weights = integration_grid(config.grid, config.steps)
    return (alphas.to(like.dtype).to(like.device),
            None if weights is None else weights.float().to(like.device))


def _weighted_sum(grad: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """sum_k w_k grad_k over a chunk ([b, d_mlp]); plain sum when the weights are uniform."""
    grad = grad.float()
    return grad.sum(0) if weights is None else (weights[:, None] * grad).sum(0)


def _finish(a: torch.Tensor, grad_sum: torch.Tensor, config: IGConfig, weighted: bool) -> torch.Tensor:
    return a.float() * grad_sum if weighted else a.float() * grad_sum / config.steps


class BatchedEngine(AttributionEngine):
    """Reference engine: full forward/backward passes, ``batch_size`` alpha steps per pass."""

    name = "batched"

    def run(self, model, fact, layers, activations, config, bar, clean_logp=None, notes=None):
        alphas, weights = _grid(config, activations)
        w_chunks = weights.split(config.batch_size) if weights is not None else [None] * len(alphas)
        out = []
        for layer in layers:
            a = activations[layer]
            grad_sum = torch.zeros_like(a, dtype=torch.float32)
            for chunk, w in zip(alphas.split(config.batch_size), w_chunks):
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
                grad_sum += _weighted_sum(grad, w)
                bar.update(len(chunk))
            out.append(_finish(a, grad_sum, config, weights is not None))
        return EngineRun(torch.stack(out), zeroed_probs(model, fact, layers), self.name, list(notes or []))


def _padded_inputs(model: LoadedModel, facts: list[EncodedFact]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts right-padded to one length ([k, L] ids, [k, L] attention mask): pads come after
    every real token, so no real position moves."""
    tok = model.tokenizer
    pad = next((i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None), 0)
    length = max(f.seq_len for f in facts)
    ids = torch.full((len(facts), length), pad, dtype=facts[0].input_ids.dtype, device=facts[0].input_ids.device)
    mask = torch.zeros_like(ids)
    for i, f in enumerate(facts):
        ids[i, :f.seq_len] = f.input_ids[0]
        mask[i, :f.seq_len] = 1
    return ids, mask


def _prompts_log_probs(model: LoadedModel, facts: list[EncodedFact], ids, mask, layer: int | None,
                       xs: list[torch.Tensor] | None, rows: int) -> torch.Tensor:
    """log P(target) of ``rows`` copies of every padded prompt (prompt-major), with prompt ``i``'s
    activation at its prediction position set to ``xs[i]`` ([rows, d_mlp]) in ``layer``."""
    handle = None
    if layer is not None:
        def patch(act):
            act = act.clone()
            for i, f in enumerate(facts):
                act[i * rows:(i + 1) * rows, f.pred_pos] = xs[i].to(act.dtype)
            return act

        handle = model.adapter.patch_site(layer, patch)
    try:
        logits = model.hf_model(ids.repeat_interleave(rows, 0), attention_mask=mask.repeat_interleave(rows, 0)).logits
    finally:
        if handle is not None:
            handle.remove()
    return torch.cat([target_log_prob(logits[i * rows:(i + 1) * rows], f) for i, f in enumerate(facts)])


#: ``AttributionResult.engine`` of prompts attributed together (:meth:`KnowledgeAttribution.attribute_prompts`)
PROMPT_BATCH_ENGINE = "batched-prompts"


def prompt_batch_scores(model: LoadedModel, facts: list[EncodedFact], activations: list[torch.Tensor],
                        clean_logps: list[torch.Tensor], layers: tuple[int, ...], config: IGConfig,
                        bar) -> list[torch.Tensor]:
    """IG scores of several prompts in shared full passes: each pass holds ``batch_size`` alpha
    steps of every prompt for one layer (the batched engine's rule, prompts right-padded).

    It proves itself first: the padded clean pass must give every prompt's own log P(target)
    (within :data:`VERIFY_TOLERANCE`), else :class:`EngineFailure`."""
    ids, mask = _padded_inputs(model, facts)
    with torch.no_grad():
        logp = _prompts_log_probs(model, facts, ids, mask, None, None, 1).double().cpu()
    err = (logp - torch.cat(clean_logps).double().cpu()).abs().nan_to_num(nan=float("inf")).max().item()
    tol = VERIFY_TOLERANCE.get(model.dtype, 0.1)
    if err > tol:
        raise EngineFailure(f"padded prompts differ from their own forward by {err:.2g} in log P(target)",
                            mismatch=True)
    alphas, weights = _grid(config, activations[0])
    w_chunks = weights.split(config.batch_size) if weights is not None else [None] * len(alphas)
    out = [torch.zeros(len(layers), model.d_mlp, dtype=torch.float32) for _ in facts]
    for r, layer in enumerate(layers):
        sums = [torch.zeros(model.d_mlp, dtype=torch.float32, device=a.device) for a in activations]
        for chunk, w in zip(alphas.split(config.batch_size), w_chunks):
            xs = [(chunk[:, None] * a[layer][None]).requires_grad_(True) for a in activations]
            with torch.enable_grad():
                lp = _prompts_log_probs(model, facts, ids, mask, layer, xs, len(chunk))
                grads = torch.autograd.grad(lp.exp().sum(), xs)
            for i, g in enumerate(grads):
                sums[i] += _weighted_sum(g, w)
            bar.update(len(chunk) * len(facts))
        for i, a in enumerate(activations):
            out[i][r] = _finish(a[layer], sums[i], config, weights is not None).cpu()
    return out


class CaptumEngine(AttributionEngine):
    """Captum's ``LayerIntegratedGradients`` on the adapter's per-layer target."""

    name = "captum"

    def run(self, model, fact, layers, activations, config, bar, clean_logp=None):
        from captum.attr import LayerIntegratedGradients

        from kn_plugin.adapters.captum import captum_target

        out = []
        for layer in layers:
            target = captum_target(model, fact, None, layer)
            lig = LayerIntegratedGradients(target.forward_func, target.layer)
            attr = lig.attribute(
                target.inputs, baselines=target.baselines, n_steps=config.steps,
                method=config.grid, internal_batch_size=config.batch_size,
            )
            out.append(attr[0].detach().float())
            bar.update(config.steps)
        return EngineRun(torch.stack(out), zeroed_probs(model, fact, layers), self.name)


#: largest |log P(target)| difference from the model's own forward a shortcut may show, per dtype
VERIFY_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 0.25, torch.float16: 0.1}


class VerifiedEngine(AttributionEngine):
    """A shortcut that proves itself on every fact before it is trusted.

    Before integrating, the engine computes log P(target) with each attributed layer's
    activation kept (alpha = 1) and zeroed (alpha = 0), and compares them with the model's
    own forward (:func:`zeroed_log_probs` and the clean pass). A difference above
    :data:`VERIFY_TOLERANCE` (a mismatch) or any exception falls back to the batched engine
    with one warning; the result records the engine that actually ran.
    """

    def applicable(self, model: LoadedModel) -> bool:
        return True

    @abstractmethod
    def prepare(self, model: LoadedModel, fact: EncodedFact):
        """Whatever :meth:`log_probs` reuses across passes (a cache of the clean prefix)."""

    @abstractmethod
    def log_probs(self, model: LoadedModel, state, fact: EncodedFact, layers: tuple[int, ...],
                  activations: torch.Tensor, alphas: torch.Tensor) -> tuple[torch.Tensor, list]:
        """log P(target) for every (layer, alpha) row, layer-major over the sorted ``layers``,
        with the patched activation ``alpha * a`` as a leaf per layer (requires grad when grad
        mode is on)."""

    def run(self, model, fact, layers, activations, config, bar, clean_logp=None):
        return run_chain([self], model, fact, layers, activations, config, bar, clean_logp)

    def reference_zeroed(self, model, fact, layers, activations, clean_logp) -> torch.Tensor:
        """[len(layers)] log P(target) with each layer zeroed, from the model's own forward."""
        return zeroed_log_probs(model, fact, layers)

    def run_verified(self, model, fact, layers, activations, config, bar, clean_logp=None) -> EngineRun:
        if clean_logp is None:
            clean_logp = _clean(model, fact)[1]
        ref_zeroed = self.reference_zeroed(model, fact, layers, activations, clean_logp)
        try:
            state = self.prepare(model, fact)
            self.verify(model, state, fact, layers, activations, ref_zeroed, clean_logp)
            scores = self.integrate(model, state, fact, layers, activations, config, bar)
        except EngineFailure:
            raise
        except Exception as exc:  # any exception inside a shortcut: fall back, loudly
            raise EngineFailure(f"{self.name} engine raised {type(exc).__name__}: {exc}") from exc
        zeroed = torch.zeros(model.n_layers, dtype=torch.float64)
        zeroed[list(layers)] = ref_zeroed.exp()
        return EngineRun(scores, zeroed, self.name)

    @torch.no_grad()
    def verify(self, model, state, fact, layers, activations, ref_zeroed, clean_logp) -> None:
        ordered = tuple(sorted(layers))
        ends = torch.tensor([0.0, 1.0], dtype=activations.dtype, device=activations.device)
        logp, _ = self.log_probs(model, state, fact, ordered, activations, ends)
        logp = logp.double().cpu().view(len(ordered), 2)
        clean = clean_logp.double().cpu()
        by_layer = dict(zip(layers, ref_zeroed.tolist()))
        ref = torch.tensor([[by_layer[layer], clean.item()] for layer in ordered], dtype=torch.float64)
        err = (logp - ref).abs().nan_to_num(nan=float("inf")).max().item()
        tol = VERIFY_TOLERANCE.get(model.dtype, 0.1)
        if err > tol:
            raise EngineFailure(
                f"{self.name} engine differs from the model's own forward by {err:.2g} in log P(target) "
                f"(tolerance {tol:g})", mismatch=True,
            )

    def integrate(self, model, state, fact, layers, activations, config, bar) -> torch.Tensor:
        alphas, weights = _grid(config, activations)
        w_chunks = weights.split(config.batch_size) if weights is not None else [None] * len(alphas)
        grad_sum = {layer: torch.zeros(activations.shape[1], dtype=torch.float32, device=activations.device)
                    for layer in layers}
        for group in _layer_groups(layers, config.layers_per_pass):
            for chunk, w in zip(alphas.split(config.batch_size), w_chunks):
                with torch.enable_grad():
                    logp, leaves = self.log_probs(model, state, fact, group, activations, chunk)
                    grads = torch.autograd.grad(logp.exp().sum(), leaves)
                for layer, g in zip(group, grads):
                    grad_sum[layer] += _weighted_sum(g, w)
                bar.update(len(chunk) * len(group))
        return torch.stack([_finish(activations[layer], grad_sum[layer], config, weights is not None)
                            for layer in layers])


def _leaf(alphas: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    x = alphas[:, None] * a[None]  # [b, d_mlp]
    return x.requires_grad_(True) if torch.is_grad_enabled() else x


class CachedEngine(VerifiedEngine):
    """Model-agnostic shortcut for causal LMs, through the model's own modules and cache API.

    Scaling the activation at the prediction position changes nothing before it. The engine
    runs the prompt prefix once with ``use_cache=True``; every pass then feeds only the tokens
    from the prediction position on, for all (layer, alpha) rows at once, to the model's own
    forward with a copy of that cache (``batch_repeat_interleave``), patching each row's layer
    with a hook. Sliding windows, QK-norms, soft-capping, multipliers and partial rotary are
    the model's own code.
    """

    name = "cached"

    def applicable(self, model):
        return not model.is_masked

    def prepare(self, model, fact):
        start = fact.pred_pos
        if start == 0:
            return None, 0
        with torch.no_grad():
            out = model.hf_model(fact.input_ids[:, :start], use_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            raise EngineFailure(f"cached engine: {type(model.hf_model).__name__} returns no key/value cache",
                                mismatch=True)
        if cache.get_seq_length() != start:  # e.g. TransformerLens' attention components skip it
            raise EngineFailure(f"cached engine: the model's cache holds {cache.get_seq_length()} of the "
                                f"{start} prefix positions (attention modules replaced by a "
                                "TransformerLens bridge?)", mismatch=True)
        return cache, start

    def log_probs(self, model, state, fact, layers, activations, alphas):
        cache, start = state
        b = len(alphas)
        rows = b * len(layers)
        past = None
        if cache is not None:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(rows)
        leaves, handles = [], []

        def patch(row, x):
            def fn(act):
                act = act.clone()
                act[row:row + b, 0] = x.to(act.dtype)
                return act

            return fn

        try:
            for r, layer in enumerate(layers):
                x = _leaf(alphas, activations[layer])
                leaves.append(x)
                handles.append(model.adapter.patch_site(layer, patch(r * b, x)))
            suffix = fact.input_ids[:, start:].expand(rows, -1)
            logits = model.hf_model(suffix, **{_cache_kwarg(model.hf_model): past},
                                    use_cache=past is not None).logits
        finally:
            for h in handles:
                h.remove()
        rel = [p - start for p in fact.score_positions]
        return sequence_log_prob(logits[:, rel], fact.target_ids), leaves


def _cache_kwarg(hf_model) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (earlier 5.x), as the forward takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"


@dataclass
class _CleanStates:
    """Per-layer states of the clean pass computed by the family's hand-written stepper."""

    mids: list[torch.Tensor]  # [1, seq, ...] what ``post`` needs besides the activation
    acts: list[torch.Tensor]  # [1, seq, d_mlp]
    kvs: list  # per layer (k, v) [1, heads, seq, head_dim], or None (bidirectional models)


class StepperEngine(VerifiedEngine):
    """Hand-written family steppers (:mod:`kn_plugin.adapters.steppers`), where they verify.

    Scaling layer ``l``'s activation at the prediction position leaves everything below layer
    ``l`` unchanged, and in a causal model every earlier position too. The engine runs one
    clean pass, keeps each layer's residual state, activation and keys/values, and then, for
    each batch of alpha steps, recomputes only layers ``l..L-1`` and (causal models) only the
    positions from the prediction position on, all attributed layers in one staircase pass.
    The LM head is applied only where targets are scored.
    """

    name = "stepper"

    def applicable(self, model):
        return model.adapter.fast_stepper() is not None

    def reference_zeroed(self, model, fact, layers, activations, clean_logp):
        """The model's own forward, in its incremental form (the prefix through the model's
        cache API, then only the positions from the prediction position on): the same numbers
        as a full forward at a fraction of the cost. It is trusted only after its alpha = 1 row
        reproduces the full forward's clean log P(target); otherwise (a TransformerLens bridge,
        whose attention skips the cache) the full forward is the reference."""
        if model.is_masked:
            return super().reference_zeroed(model, fact, layers, activations, clean_logp)
        cached = CachedEngine()
        try:
            state = cached.prepare(model, fact)
            ordered = tuple(sorted(layers))
            ends = torch.tensor([0.0, 1.0], dtype=model.dtype, device=model.device)
            with torch.no_grad():  # alpha = 0: each row's layer zeroed; alpha = 1: the clean forward
                logp, _ = cached.log_probs(model, state, fact, ordered, activations, ends)
            logp = logp.double().cpu().view(len(ordered), 2)
            err = (logp[:, 1] - clean_logp.double().cpu()).abs().max().item()
            if not err <= VERIFY_TOLERANCE.get(model.dtype, 0.1):
                raise EngineFailure(f"incremental forward differs from the full one by {err:.2g}")
        except Exception as exc:  # the full forward below is the reference then
            logger.debug("incremental reference unavailable (%s): full forward", exc)
            return super().reference_zeroed(model, fact, layers, activations, clean_logp)
        by_layer = dict(zip(ordered, logp[:, 0].tolist()))
        return torch.tensor([by_layer[layer] for layer in layers], dtype=torch.float64)

    def prepare(self, model, fact):
        stepper = model.adapter.fast_stepper()
        with torch.no_grad():
            h = stepper.embed(fact.input_ids)
            mids, acts, kvs = [], [], []
            for layer in range(model.n_layers):
                mid, act, kv = stepper.pre(layer, h, None, 0)
                mids.append(mid)
                acts.append(act)
                kvs.append(kv)
                h = stepper.post(layer, act, mid)
        return stepper, _CleanStates(mids, acts, kvs)

    def log_probs(self, model, state, fact, layers, activations, alphas):
        stepper, clean = state
        start = fact.pred_pos if stepper.causal else 0
        return _staircase(stepper, clean, fact, tuple(sorted(layers)), activations, alphas, start)


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
            x = _leaf(alphas, activations[j])
            leaves.append(x)
            act = clean.acts[j][:, start:].expand(b, -1, -1)
            act = torch.cat([act[:, :p], x[:, None].to(act.dtype), act[:, p + 1:]], 1)
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
        logp = torch.log_softmax(torch.nn.functional.linear(x, weight, bias).float(), dim=-1)
        ctx.save_for_backward(weight, logp, target)
        return logp.gather(1, target[:, None]).squeeze(1)

    @staticmethod
    def backward(ctx, grad):
        weight, logp, target = ctx.saved_tensors
        dz = logp.exp_().mul_(-grad[:, None])  # -g * softmax, in place
        dz.scatter_add_(1, target[:, None], grad[:, None])  # + g * onehot(target)
        return dz.to(weight.dtype) @ weight, None, None, None


def _layer_groups(layers: tuple[int, ...], size: int | None) -> list[tuple[int, ...]]:
    ordered = tuple(sorted(layers))
    size = size or len(ordered)
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


class KnowledgeNeuronWarning(UserWarning):
    """A shortcut could not be trusted and kn_plugin fell back to a slower exact path."""


def run_chain(candidates: list[VerifiedEngine], model, fact, layers, activations, config, bar,
              clean_logp=None) -> EngineRun:
    """Run the first candidate that applies and verifies; else the batched engine.

    A candidate that disagreed with the model's forward is not tried again on that model. When
    a candidate failed in this call and the batched engine takes over, one warning says why.
    """
    notes, failed = [], []
    for engine in candidates:
        if not engine.applicable(model):
            continue
        if engine.name in model.failed_paths:
            notes.append(f"{engine.name}: did not verify on this model earlier")
            continue
        try:
            run = engine.run_verified(model, fact, layers, activations, config, bar, clean_logp)
            run.notes = notes
            return run
        except EngineFailure as exc:
            if exc.mismatch:
                model.failed_paths.add(engine.name)
            notes.append(str(exc))
            failed.append(str(exc))
            logger.info("%s: %s", model.name, exc)
    if failed:
        warnings.warn(f"{model.name}: {failed[-1]}; using the batched engine", KnowledgeNeuronWarning,
                      stacklevel=4)
    return BatchedEngine().run(model, fact, layers, activations, config, bar, notes=notes)


class FastEngine(AttributionEngine):
    """The default: the hand-written stepper where it verifies, else the model-agnostic cached
    engine (causal LMs), else the batched engine; ``AttributionResult.engine`` says which ran."""

    name = "fast"

    def run(self, model, fact, layers, activations, config, bar, clean_logp=None):
        return run_chain([StepperEngine(), CachedEngine()], model, fact, layers, activations, config, bar,
                         clean_logp)


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


class KnowledgeAttribution:
    """Integrated Gradients over FFN neurons, one layer at a time (Captum-style ``attribute``).

    >>> ka = KnowledgeAttribution(load_model("tiny-llama"))
    >>> res = ka.attribute("The capital of France is", " Paris")
    >>> res.scores.shape   # [n_layers, d_mlp]
    """

    def __init__(self, model, engine: str | AttributionEngine = DEFAULT_ENGINE, tokenizer=None):
        self.model = wrap(model, tokenizer=tokenizer)
        self.engine = get_engine(engine)

    def attribute(
        self, prompt, target: str, steps: int | str = 20, layers: list[int] | None = None,
        batch_size: int = 10, progress: bool = True, layers_per_pass: int | None = None,
        grid: str = DEFAULT_GRID, tolerance: float = AUTO_TOLERANCE, max_steps: int = AUTO_MAX_STEPS,
    ) -> AttributionResult:
        """IG scores of every neuron of the chosen layers (default: all) for one fact.

        ``prompt``: text, or token ids used as they are (see :func:`kn_plugin.encode_fact`).
        ``grid``: the integration rule (:data:`GRIDS`, Captum's names; default the paper's
        right Riemann sum). ``steps="auto"`` raises m along :data:`AUTO_STEPS` (up to
        ``max_steps``) until every layer's completeness gap is at most ``tolerance`` times
        that layer's P(full) - P(zeroed) (see :func:`worst_relative_gap`); ``result.steps`` is the
        m used, and a warning says when the cap was reached first.
        ``batch_size`` alpha steps per pass; the fast engines also batch ``layers_per_pass``
        layers together (default: all; lower it to save memory on large models). Runs in eval
        mode without weight gradients; the model's mode and flags are restored afterwards.
        """
        if isinstance(steps, str) and steps == "auto":
            return self._attribute_auto(prompt, target, layers, batch_size, progress, layers_per_pass, grid,
                                        tolerance, max_steps)
        config = IGConfig(steps=steps, batch_size=batch_size,
                          layers=tuple(layers) if layers is not None else None, progress=progress,
                          layers_per_pass=layers_per_pass, grid=grid)
        model = self.model
        with model.frozen():
            fact = encode_fact(model, prompt, target)
            chosen = config.layers if config.layers is not None else tuple(range(model.n_layers))
            for layer in chosen:
                model.adapter.check_layer(layer)
            activations, logp = _clean(model, fact)
            _check_representable(model, fact, logp)
            scores = torch.zeros(activations.shape, dtype=torch.float32)
            zeroed = torch.zeros(model.n_layers, dtype=torch.float64)
            engine, notes = self.engine.name, []
            with tqdm(total=len(chosen) * config.steps, disable=not config.progress,
                      desc=f"IG {fact.prompt[:30]!r}", unit="step", leave=False) as bar:
                if chosen:
                    run = self.engine.run(model, fact, chosen, activations, config, bar, clean_logp=logp)
                    scores[list(chosen)] = run.scores.float().cpu()
                    zeroed, engine, notes = run.zeroed, run.engine, run.notes
        extras = {"grid": config.grid}
        if notes:
            extras["engine_notes"] = notes
        return AttributionResult(
            model=model.name, prompt=fact.prompt, target=target, scores=scores,
            activations=activations.float().cpu(), target_prob=logp.exp()[0].item(),
            zeroed_prob=zeroed, layers=chosen, steps=config.steps,
            engine=engine, extras=extras,
        )

    def attribute_prompts(
        self, prompts, target: str, steps: int = 20, layers: list[int] | None = None, batch_size: int = 10,
        progress: bool = True, grid: str = DEFAULT_GRID,
    ) -> list[AttributionResult]:
        """IG scores of several prompts (a fact's paraphrases, any lengths) for one target, in
        shared full passes: each pass holds ``batch_size`` alpha steps of every prompt for one
        layer (:func:`prompt_batch_scores`). Equal to :meth:`attribute` with the batched engine;
        it pays where a pass is far from saturating the device (GPUs, models without a fast
        engine). When the padded pass does not reproduce each prompt's own forward, a warning
        says so and the prompts run one at a time on this object's engine."""
        config = IGConfig(steps=steps, batch_size=batch_size, layers=tuple(layers) if layers is not None else None,
                          progress=progress, grid=grid)
        model = self.model
        with model.frozen():
            facts = [encode_fact(model, p, target) for p in prompts]
            chosen = config.layers if config.layers is not None else tuple(range(model.n_layers))
            for layer in chosen:
                model.adapter.check_layer(layer)
            cleans = [_clean(model, f) for f in facts]
            try:
                with tqdm(total=len(chosen) * config.steps * len(facts), disable=not config.progress,
                          desc=f"IG {len(facts)} prompts", unit="step", leave=False) as bar:
                    scores = prompt_batch_scores(model, facts, [c[0] for c in cleans], [c[1] for c in cleans],
                                                 chosen, config, bar)
            except EngineFailure as exc:
                warnings.warn(f"{model.name}: {exc}; attributing one prompt at a time", KnowledgeNeuronWarning,
                              stacklevel=2)
                return [self.attribute(p, target, steps=steps, layers=layers, batch_size=batch_size,
                                       progress=progress, grid=grid) for p in prompts]
            results = []
            for f, (acts, logp), sc in zip(facts, cleans, scores):
                full = torch.zeros(acts.shape, dtype=torch.float32)
                full[list(chosen)] = sc
                results.append(AttributionResult(
                    model=model.name, prompt=f.prompt, target=target, scores=full, activations=acts.float().cpu(),
                    target_prob=logp.exp()[0].item(), zeroed_prob=zeroed_probs(model, f, chosen), layers=chosen,
                    steps=config.steps, engine=PROMPT_BATCH_ENGINE, extras={"grid": config.grid}))
        return results

    def _attribute_auto(self, prompt, target, layers, batch_size, progress, layers_per_pass, grid, tolerance,
                        max_steps) -> AttributionResult:
        tolerance = finite("tolerance", tolerance)
        if tolerance <= 0:
            raise KnowledgeNeuronError(f"tolerance must be > 0, got {tolerance:g}")
        max_steps = positive_int("max_steps", max_steps)
        if max_steps > MAX_STEPS:
            raise KnowledgeNeuronError(f"max_steps must be at most {MAX_STEPS:,}, got {max_steps:,}")
        ladder = [m for m in AUTO_STEPS if m < max_steps] + [max_steps]
        if check_grid(grid) == "riemann_trapezoid":
            if max_steps < 2:
                raise KnowledgeNeuronError("the trapezoid rule needs max_steps >= 2")
            ladder = [m for m in ladder if m >= 2]
        # per layer: a layer leaves the ladder at the first m whose gap meets the tolerance, so
        # layers with a smooth path do not pay for one with a step in it (IG of a layer does not
        # depend on the other layers: each row equals attribute(steps=m) of that layer alone)
        pending, first, per_layer, tried, engines = layers, None, {}, [], []
        for m in ladder:
            res = self.attribute(prompt, target, steps=m, layers=pending, batch_size=batch_size, progress=progress,
                                 layers_per_pass=layers_per_pass, grid=grid)
            if first is None:
                first, floor = res, layer_effect_floor(res)
            engines.append(res.engine)
            gaps = relative_gaps(res, floor)
            tried.append((m, max(gaps.values(), default=0.0)))
            for layer, gap in gaps.items():
                if gap <= tolerance or m == ladder[-1]:
                    per_layer[layer] = m
                    first.scores[layer] = res.scores[layer]
                    first.zeroed_prob[layer] = res.zeroed_prob[layer]
            pending = [layer for layer, gap in gaps.items() if layer not in per_layer]
            if not pending:
                break
        worst = tried[-1][1]
        if worst > tolerance:
            warnings.warn(f"steps='auto' stopped at the cap m={max_steps} ({grid}) with a completeness gap of "
                          f"{worst:.2g} x the layer's effect, above the tolerance {tolerance:g}",
                          KnowledgeNeuronWarning, stacklevel=3)
        first.steps = max(per_layer.values(), default=ladder[0])
        first.extras["auto_steps"] = tried
        first.extras["steps_per_layer"] = [per_layer.get(layer) for layer in range(len(first.zeroed_prob))]
        if len(set(engines)) > 1:
            first.extras["engines_per_rung"] = engines
        return first


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
