"""Attribution methods that drive the knowledge-neuron pipeline.

Every method gives, for one prompt, a score per FFN neuron at the prediction position
([n_layers, d_mlp]); :func:`kn_plugin.locate` turns scores into coarse and refined neurons
the same way whatever produced them.

* ``"ig"``: Integrated Gradients of P(target), zero baseline (the paper; the fast engines);
* ``"activation"``: the raw activation (the paper's baseline selector);
* ``"grad_x_act"``: activation x dP(target)/d activation, all layers from one forward and
  one backward (equal to Captum's ``LayerGradientXActivation`` on :func:`captum_target`);
* ``"atp"``: attribution patching (Kramar et al. 2024) towards the zero baseline: the
  first-order estimate of how much log P(target) drops when a neuron is set to zero at every
  position of the prompt, ``sum_pos a[pos] * d log P / d a[pos]``; also one forward and one
  backward for all layers;
* ``"conductance"``: Captum's ``LayerConductance`` on the per-layer target (m steps, the
  paper's right Riemann grid);
* a Captum layer attribution class (``method=LayerGradientXActivation``, or
  ``"captum:LayerGradientXActivation"``), run per layer on :func:`captum_target`;
* a callable ``fn(model, fact) -> [n_layers, d_mlp]`` (``model`` a :class:`LoadedModel`,
  ``fact`` an :class:`~kn_plugin.scoring.EncodedFact`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kn_plugin.attribution.config import DEFAULT_BATCH_SIZE, AttributionResult
from kn_plugin.attribution.core import KnowledgeAttribution
from kn_plugin.attribution.engines.base import clean_pass
from kn_plugin.attribution.grid import AUTO_TOLERANCE
from kn_plugin.defaults import PAPER_STEPS
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.integrations.captum import captum_target
from kn_plugin.scoring import encode_fact, target_log_prob


@dataclass(frozen=True)
class Method:
    """A resolved attribution method: ``name`` is what results record."""

    name: str
    kind: str  # "ig", "activation", "gradient", "captum" or "callable"
    impl: Any = None


def _conductance() -> Method:
    from captum.attr import LayerConductance

    return Method("conductance", "captum", LayerConductance)


#: the built-in methods by name, each a factory (Captum's classes are imported when asked for)
METHODS: dict[str, Callable[[], Method]] = {
    "ig": lambda: Method("ig", "ig"),
    "activation": lambda: Method("activation", "activation"),
    "grad_x_act": lambda: Method("grad_x_act", "gradient"),
    "atp": lambda: Method("atp", "gradient"),
    "conductance": _conductance,
}
BUILTIN = tuple(METHODS)
#: methods that cost one forward and one backward per prompt for all layers
ONE_PASS = ("grad_x_act", "atp")


def _captum_class(name: str):
    import captum.attr

    cls = getattr(captum.attr, name, None)
    if not inspect.isclass(cls):
        raise KnowledgeNeuronError(f"captum.attr has no class {name!r}")
    return cls


def _check_captum_class(cls) -> None:
    """Refuse Captum classes the per-layer target cannot drive, before anything runs."""
    init = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if not init or init[0].name != "forward_func":
        first = init[0].name if init else "nothing"
        raise KnowledgeNeuronError(
            f"{cls.__name__} takes {first!r}, not a forward function: the knowledge-neuron target offers "
            "forward_func, layer, inputs and baselines (use a Captum layer method such as LayerGradientXActivation)"
        )
    if len(init) < 2 or init[1].name != "layer":
        raise KnowledgeNeuronError(f"{cls.__name__} is not a Captum layer method (it takes no layer)")
    attribute = getattr(cls, "attribute", None)
    if attribute is None:
        raise KnowledgeNeuronError(f"{cls.__name__} has no attribute() method")
    given = {"self", "inputs", "baselines", "n_steps", "method", "internal_batch_size", "target",
             "additional_forward_args", "attribute_to_layer_input"}
    missing = [p.name for p in inspect.signature(attribute).parameters.values()
               if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and p.name not in given]
    if missing:
        raise KnowledgeNeuronError(f"{cls.__name__}.attribute needs {', '.join(missing)}, which the knowledge-neuron "
                                   "target cannot give")


def method_identity(method) -> str:
    """What a result folder keys ``method`` by, so that a resumed folder never mixes methods:
    the name of a built-in or of a :class:`Method` the user named; for a plain function its
    module and qualified name. An anonymous or nested function has no name that tells it from
    another one: refused, with how to name it."""
    resolved = resolve_method(method)
    if isinstance(method, Method) or resolved.kind != "callable":
        return resolved.name
    qualname = getattr(method, "__qualname__", None)  # None: an instance, whose state has no name either
    if qualname is None or "<lambda>" in qualname or "<locals>" in qualname:
        shown = qualname or f"a {type(method).__name__} object"
        raise KnowledgeNeuronError(
            f"a result folder cannot tell {shown!r} from another callable of that name: give method= a "
            "module-level function, or name it: kn_plugin.attribution.methods.Method('my-method', 'callable', fn)")
    return f"callable:{method.__module__}.{qualname}"


def resolve_method(method) -> Method:
    """A method name, ``"captum:ClassName"``, a Captum layer class or a callable -> :class:`Method`."""
    if isinstance(method, Method):
        return method
    if isinstance(method, str):
        if method in METHODS:
            return METHODS[method]()
        if method.startswith("captum:"):
            cls = _captum_class(method.split(":", 1)[1])
            _check_captum_class(cls)
            return Method(f"captum:{cls.__name__}", "captum", cls)
        raise KnowledgeNeuronError(f"unknown method {method!r}: one of {', '.join(BUILTIN)}, captum:<LayerClass>, "
                                   "a Captum layer attribution class or a callable(model, fact)")
    if inspect.isclass(method):
        if not method.__module__.startswith("captum."):
            raise KnowledgeNeuronError(f"method class {method.__name__} is not a Captum attribution class")
        _check_captum_class(method)
        return Method(f"captum:{method.__name__}", "captum", method)
    if callable(method):
        return Method(f"callable:{getattr(method, '__name__', type(method).__name__)}", "callable", method)
    raise KnowledgeNeuronError(f"method must be a name, a Captum layer class or a callable, got {type(method).__name__}")


def gradient_scores(model, fact, all_positions: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One forward and one backward for every layer at once.

    A zero leaf ``delta`` is added to each layer's activation (at the prediction position, or
    at every position with ``all_positions``); the gradient of the metric w.r.t. ``delta`` is
    the gradient w.r.t. the activation. Metric: P(target) for ``grad_x_act``, log P(target)
    for attribution patching. Returns scores [n_layers, d_mlp], the activations at the
    prediction position [n_layers, d_mlp] and P(target)."""

    acts: dict[int, torch.Tensor] = {}
    deltas: dict[int, torch.Tensor] = {}
    pos = fact.pred_pos

    def hook(layer):
        def fn(act):
            acts[layer] = act[0].detach().clone()
            shape = act.shape[1:] if all_positions else act.shape[2:]
            delta = torch.zeros(shape, dtype=act.dtype, device=act.device, requires_grad=True)
            deltas[layer] = delta
            if all_positions:
                return act + delta[None]
            act = act.clone()
            act[:, pos] = act[:, pos] + delta
            return act

        return fn

    with model.adapter.patched({layer: hook(layer) for layer in range(model.n_layers)}), torch.enable_grad():
        logp = target_log_prob(model.hf_model(fact.input_ids).logits, fact)[0]
        metric = logp if all_positions else logp.exp()
        grads = torch.autograd.grad(metric, [deltas[i] for i in range(model.n_layers)])
    if all_positions:
        scores = torch.stack([(acts[i].float() * g.float()).sum(0) for i, g in enumerate(grads)])
    else:
        scores = torch.stack([acts[i][pos].float() * g.float() for i, g in enumerate(grads)])
    at_pos = torch.stack([acts[i][pos] for i in range(model.n_layers)]).float()
    return scores, at_pos, logp.exp().item()


def captum_scores(model, fact, cls, steps: int, batch_size: int, grid: str) -> torch.Tensor:
    """A Captum layer method run per layer on :func:`captum_target` ([n_layers, d_mlp])."""

    params = inspect.signature(cls.attribute).parameters
    rows = []
    for layer in range(model.n_layers):
        t = captum_target(model, fact, None, layer)
        kwargs = {}
        if "baselines" in params:
            kwargs["baselines"] = t.baselines
        if "n_steps" in params:
            kwargs["n_steps"] = steps
        if "method" in params:
            kwargs["method"] = grid
        if "internal_batch_size" in params:
            kwargs["internal_batch_size"] = batch_size
        try:
            out = cls(t.forward_func, t.layer).attribute(t.inputs, **kwargs)
        except Exception as exc:  # a Captum method that cannot work on this target
            text = str(exc).strip().splitlines()
            raise KnowledgeNeuronError(f"{cls.__name__} failed on the knowledge-neuron target "
                                       f"({type(exc).__name__}: {text[0] if text else ''})") from None
        if isinstance(out, (tuple, list)):
            out = out[0]
        rows.append(_checked(out.detach().reshape(-1), (model.d_mlp,), cls.__name__))
    return torch.stack(rows).float().cpu()


def _checked(scores, shape: tuple[int, ...], what: str) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise KnowledgeNeuronError(f"{what} returned {type(scores).__name__}, expected a tensor of shape {list(shape)}")
    if tuple(scores.shape) != shape:
        raise KnowledgeNeuronError(f"{what} returned shape {list(scores.shape)}, expected {list(shape)} "
                                   "([n_layers, d_mlp])")
    if not torch.isfinite(scores).all():
        raise KnowledgeNeuronError(f"{what} returned NaN or infinite scores")
    return scores


def method_attribution(model, method: Method, prompt, target: str, *, steps=PAPER_STEPS, batch_size: int | None = None,
                       engine="fast", grid: str = "riemann_right", tolerance=None, progress: bool = True,
                       matmul_dtype=None):
    """One prompt's :class:`~kn_plugin.attribution.AttributionResult` under ``method``.

    For methods other than IG, ``layers`` is empty (no completeness check applies),
    ``steps`` is what the method used (1 for one-pass methods) and ``engine`` the method."""

    if method.kind == "ig":
        return KnowledgeAttribution(model, engine=engine).attribute(
            prompt, target, steps=steps, batch_size=batch_size, progress=progress, grid=grid,
            tolerance=AUTO_TOLERANCE if tolerance is None else tolerance, matmul_dtype=matmul_dtype)
    if method.kind == "activation":
        return KnowledgeAttribution(model, engine=engine).attribute(prompt, target, steps=1, layers=[], progress=False)
    with model.frozen():
        fact = encode_fact(model, prompt, target)
        used_steps = 1
        if method.kind == "gradient":
            scores, acts, prob = gradient_scores(model, fact, all_positions=method.name == "atp")
        else:
            acts, prob = clean_pass(model, fact)
            acts = acts.float()
            if method.kind == "captum":
                scores = captum_scores(model, fact, method.impl, steps,
                                       DEFAULT_BATCH_SIZE if batch_size is None else batch_size, grid)
                used_steps = steps if "n_steps" in inspect.signature(method.impl.attribute).parameters else 1
            else:
                out = method.impl(model, fact)
                scores = _checked(out, (model.n_layers, model.d_mlp), f"method {method.name}").detach().float()
    return AttributionResult(
        model=model.name, prompt=fact.prompt, target=target, scores=scores.cpu(), activations=acts.cpu(),
        target_prob=prob, zeroed_prob=torch.zeros(model.n_layers, dtype=torch.float64), layers=(),
        steps=used_steps, engine=method.name, extras={"method": method.name},
    )
