"""What every engine shares: the clean pass, the zeroed-layer reference, the IG sum, and the
engine interface."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from kn_plugin.attribution.config import EngineRun, IGConfig
from kn_plugin.attribution.grid import integration_grid
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.families.adapter import resolve
from kn_plugin.models import LoadedModel
from kn_plugin.scoring import EncodedFact, forward_at, logits_at, sequence_log_prob

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


class EngineFailure(RuntimeError):
    """A shortcut engine failed on a fact: ``mismatch`` when it disagreed with the model."""

    def __init__(self, message: str, mismatch: bool = False):
        super().__init__(message)
        self.mismatch = mismatch


class AttributionEngine(ABC):
    """Computes IG scores for chosen layers. Engines must agree to numerical precision."""

    name: str = "abstract"
    #: whether its runs give ``EngineRun.gradients`` (``steps="adaptive"`` needs them)
    gives_gradients: bool = True
    #: (layer, alpha) rows it puts in one pass when the caller gives no batch size (None: it
    #: runs one layer per pass, :data:`~kn_plugin.attribution.config.DEFAULT_BATCH_SIZE` steps)
    pass_rows: int | None = None

    @abstractmethod
    def run(self, model: LoadedModel, fact: EncodedFact, layers: tuple[int, ...], activations: torch.Tensor,
            config: IGConfig, bar: tqdm, clean: CleanPass | None = None) -> EngineRun:
        """``activations`` is the clean [n_layers, d_mlp] at the prediction position and
        ``clean`` the model's own forward (:func:`_clean` with :meth:`capture`), when the caller ran it."""

    def capture(self, model: LoadedModel) -> tuple[str, ...] | None:
        """What this engine reuses from the clean pass: None (nothing beyond the activations and
        log P(target)), or the layer submodules whose inputs it reads (possibly none), which
        also asks for every layer's activation and the model's key/value cache."""
        return None


class phase(contextlib.ContextDecorator):  # noqa: N801 - used like a function
    """A named range ``kn::<name>`` for ``torch.profiler`` (next to nothing without a profiler),
    as a context manager or decorator: the phases of an attribution (clean pass, reference,
    prepare, verify, integrate, refine) that ``kn bench speed`` reports."""

    def __init__(self, name: str):
        self.name = f"kn::{name}"

    def _recreate_cm(self):  # a fresh range per decorated call (reentrant, thread-safe)
        return torch.profiler.record_function(self.name)

    def __enter__(self):
        self._range = torch.profiler.record_function(self.name)
        return self._range.__enter__()

    def __exit__(self, *exc):
        return self._range.__exit__(*exc)


@dataclass
class CleanPass:
    """The model's own clean forward of a fact, which every engine starts from.

    ``acts``: [n_layers, d_mlp] at the prediction position; ``logp``: log P(target) ([1]).
    What a shortcut engine asked for (:meth:`AttributionEngine.capture`) comes with it, so that
    it need not run the prompt again: ``layer_acts`` (per layer, [1, seq, d_mlp]), ``inputs``
    (per captured submodule path, per layer, what the submodule received: [1, seq, ...]) and
    ``cache``, the model's own key/value cache of the whole prompt (None where the model gave
    none). Engines check what they derive from it before trusting it.
    """

    acts: torch.Tensor
    logp: torch.Tensor
    layer_acts: list[torch.Tensor] | None = None
    inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    cache: object | None = None


@phase("clean")
def _clean(model: LoadedModel, fact: EncodedFact, capture: tuple[str, ...] | None = None) -> CleanPass:
    """One forward of the model: the activations at the prediction position of every layer and
    log P(target); with ``capture`` (submodule paths inside a layer; () for none) also every
    layer's full activation, those submodules' inputs and, for a causal model, its key/value
    cache (``use_cache=True``). The LM head runs on the scored positions only where the model
    takes ``logits_to_keep``."""
    n = model.n_layers
    full: dict[int, torch.Tensor] = {}
    inputs: dict[str, dict[int, torch.Tensor]] = {path: {} for path in capture or ()}

    def grab(layer):  # the whole activation where an engine reuses it, else the prediction position's
        def fn(act):
            full[layer] = (act if capture is not None else act[:, fact.pred_pos:fact.pred_pos + 1]).detach().clone()
            return act

        return fn

    def keep(path, layer):
        def hook(_mod, args):  # clone: some families add into their inputs in place
            inputs[path][layer] = args[0].detach().clone()

        return hook

    handles = []
    forward = {"use_cache": True} if capture is not None and not model.is_masked else {}
    try:
        for path in inputs:
            for layer, block in enumerate(model.adapter.layers()):
                module = resolve(block, path)
                if module is not None:
                    handles.append(module.register_forward_pre_hook(keep(path, layer)))
        with model.adapter.patched({layer: grab(layer) for layer in range(n)}), torch.no_grad():
            try:
                logits, out = forward_at(model, fact.input_ids, fact.score_positions, **forward)
            except TypeError:  # a forward that takes no ``use_cache``: the plain pass, without a cache
                if not forward:
                    raise
                logits, out = forward_at(model, fact.input_ids, fact.score_positions)
    finally:
        for h in handles:
            h.remove()
    acts = torch.stack([full[i][0, fact.pred_pos if capture is not None else 0] for i in range(n)])
    clean = CleanPass(acts, sequence_log_prob(logits, fact.target_ids))
    if capture is not None:
        clean.layer_acts = [full[i] for i in range(n)]
        clean.inputs = {path: [got[i] for i in range(n)] for path, got in inputs.items() if len(got) == n}
        clean.cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    return clean


def clean_pass(model: LoadedModel, fact: EncodedFact) -> tuple[torch.Tensor, float]:
    """Activations at the prediction position for every layer ([n_layers, d_mlp]) and P(target)."""
    clean = _clean(model, fact)
    return clean.acts, clean.logp.exp()[0].item()


def zeroed_log_probs(model: LoadedModel, fact: EncodedFact, layers: tuple[int, ...]) -> torch.Tensor:
    """[len(layers)] log P(target) with layer ``layers[r]`` zeroed at the prediction position,
    computed by the model's own forward in one batched pass."""
    if not layers:
        return torch.zeros(0, dtype=torch.float64)

    def zero_row(row):
        def fn(act):
            act = act.clone()
            act[row, fact.pred_pos] = 0
            return act

        return fn

    with model.adapter.patched((layer, zero_row(row)) for row, layer in enumerate(layers)), torch.no_grad():
        logits = logits_at(model, fact.input_ids.expand(len(layers), -1), fact.score_positions)
    return sequence_log_prob(logits, fact.target_ids).double().cpu()


def zeroed_probs(model: LoadedModel, fact: EncodedFact, layers: tuple[int, ...]) -> torch.Tensor:
    """[n_layers]: P(target) with each of ``layers`` zeroed at the prediction position (others 0)."""
    out = torch.zeros(model.n_layers, dtype=torch.float64)
    if layers:
        out[list(layers)] = zeroed_log_probs(model, fact, layers).exp()
    return out


def spend_saved(ctx) -> None:
    """Mark ``ctx``'s saved log-probabilities as overwritten; a second backward raises instead of
    returning a wrong gradient."""
    if getattr(ctx, "spent", False):
        raise RuntimeError("kn's lean log-softmax backward runs once per graph (its saved tensor is "
                           "overwritten): do not backward twice with retain_graph=True")
    ctx.spent = True


def target_logp_grad(logp: torch.Tensor, target: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d/dz of ``grad * log_softmax(z)[target]`` per row, from the saved ``logp`` [rows, vocab]
    (overwritten: one [rows, vocab] tensor in all): ``grad * (onehot(target) - softmax(z))``.
    The saved tensor serves one backward: the callers refuse a second (``retain_graph``)."""
    grad = grad[:, None].to(logp.dtype)
    dz = logp.exp_().mul_(-grad)
    dz.scatter_add_(1, target[:, None], grad)
    return dz


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


#: largest |log P(target)| difference from the model's own forward a shortcut may show, per dtype
VERIFY_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 0.25, torch.float16: 0.1}


class KnowledgeNeuronWarning(UserWarning):
    """A shortcut could not be trusted and kn_plugin fell back to a slower exact path."""
