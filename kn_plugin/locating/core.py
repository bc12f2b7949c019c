"""``locate``: the paper's whole pipeline for one fact, attribution on every prompt, coarse
sets, refinement, in one call on any model users hold."""

from __future__ import annotations

import warnings

import torch

from kn_plugin.attribution import (
    AUTO_TOLERANCE,
    DEFAULT_ENGINE,
    DEFAULT_GRID,
    STEP_RULES,
    KnowledgeAttribution,
)
from kn_plugin.attribution.methods import method_attribution
from kn_plugin.defaults import PAPER_STEPS
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.locating.config import LocateConfig
from kn_plugin.locating.result import LOW_PROB, LocateResult, LowProbabilityWarning, RefinementNote
from kn_plugin.locating.select import (
    ADAPTIVE_RANGE,
    DEFAULT_SHARE,
    DEFAULT_THRESHOLD,
    activation_neurons,
    coarse_neurons,
    refine,
    refine_adaptive,
)
from kn_plugin.models import LoadedModel, accepts_model, wrap


def _note(n_neurons: int, n_prompts: int, share: float | None, adaptive: bool) -> str | None:
    """One line when a refined set is empty or outside the paper's 2-5 neurons."""
    lo, hi = ADAPTIVE_RANGE
    if n_prompts < 2 or lo <= n_neurons <= hi:
        return None
    need = int(share * n_prompts) + 1 if share is not None else n_prompts
    if n_neurons == 0 and not adaptive:
        return (f"no neuron is in more than {share:g} of the {n_prompts} prompts' coarse sets (each needs "
                f"{need} of {n_prompts}): lower --share or drop it for the paper's adaptive tuning")
    if n_neurons == 0:
        return (f"no share p kept any neuron common to the {n_prompts} prompts: add paraphrases or lower "
                "the threshold")
    how = f"adaptive share stopped at {share:g}" if adaptive else f"share {share:g}"
    advice = ("more paraphrases separate them better" if n_neurons > hi
              else "fewer or closer paraphrases, or a lower threshold, keep more")
    return f"{n_neurons} refined neurons, outside the paper's {lo}-{hi} ({how}): {advice}"


def locate_quietly(model, prompts, target: str, config: LocateConfig | None = None, **kwargs) -> LocateResult:
    """:func:`locate` for loops over many facts: the refinement note stays in ``result.note``
    instead of a warning per fact (every other warning still shows). ``config``: settings
    already checked (a :class:`LocateConfig`), instead of locate's keyword arguments."""
    if config is not None and kwargs:
        raise KnowledgeNeuronError("give either a LocateConfig or locate's keyword arguments, not both")
    if config is not None and not isinstance(config, LocateConfig):
        raise KnowledgeNeuronError(f"config must be a LocateConfig, got {type(config).__name__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RefinementNote)
        if config is None:
            return locate(model, prompts, target, **kwargs)
        return locate_with(wrap(model), prompts, target, config)


@accepts_model
def locate(
    model: LoadedModel, prompts, target: str, steps: int = PAPER_STEPS,
    threshold: float = DEFAULT_THRESHOLD, share: float | None = None, adaptive: bool | None = None,
    min_prompts: int = 1, method="ig", engine: str = DEFAULT_ENGINE,
    batch_size: int | None = None, progress: bool = True, grid: str = DEFAULT_GRID,
    tolerance: float = AUTO_TOLERANCE, batch_prompts: bool = False, matmul_dtype=None,
) -> LocateResult:
    """Find the knowledge neurons of a fact.

    With one prompt the result is the coarse set. With several, the refined set: by default
    the paper's adaptive tuning (p from 0.7 in steps of 0.05 until 2-5 neurons remain);
    ``share=p`` fixes p (``adaptive=True`` with it starts the tuning from p). When the refined
    set is empty or outside 2-5 neurons, ``result.note`` says so in one line, also as a
    warning. ``method``: ``"ig"`` (the paper), ``"activation"`` (its raw-activation baseline),
    ``"grad_x_act"``, ``"atp"``, ``"conductance"``, a Captum layer attribution class (or
    ``"captum:ClassName"``) or a callable ``fn(model, fact) -> [n_layers, d_mlp]``; see
    :mod:`kn_plugin.attribution.methods`. Every method feeds the same coarse/refined/adaptive selection
    and the result records it (``result.method``).

    ``grid``/``steps``/``tolerance``: the integration rule and its steps, as in
    :meth:`KnowledgeAttribution.attribute` (``steps="auto"`` included).
    ``matmul_dtype``: ``"bfloat16"``/``"float16"`` runs IG's layer products in that dtype on the
    fast engines, checked against the model's own forward (see
    :meth:`KnowledgeAttribution.attribute`); each attribution records what ran.
    ``batch_prompts``: attribute the prompts together in shared padded passes
    (:meth:`KnowledgeAttribution.attribute_prompts`) instead of one at a time on ``engine``;
    equal scores, faster only where one prompt's pass leaves the device idle (see
    ``kn bench throughput``; on CPU the default per-prompt fast engine is faster).

    ``model``: anything :func:`kn_plugin.wrap` takes (``tokenizer=`` with a bare Hugging Face
    module); each prompt is text or token ids (a [k, seq] tensor is k prompts).
    """

    config = LocateConfig(steps=steps, threshold=threshold, share=share, adaptive=adaptive, min_prompts=min_prompts,
                          method=method, engine=engine, batch_size=batch_size, progress=progress, grid=grid,
                          tolerance=tolerance, batch_prompts=batch_prompts, matmul_dtype=matmul_dtype)
    return locate_with(model, prompts, target, config)


def locate_with(model: LoadedModel, prompts, target: str, config: LocateConfig) -> LocateResult:
    """:func:`locate` on a :class:`LoadedModel` with settings already checked."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and all(isinstance(i, int) for i in prompts)):
        prompts = [prompts]
    elif isinstance(prompts, torch.Tensor):
        prompts = list(prompts) if prompts.dim() == 2 else [prompts]
    if not prompts:
        raise KnowledgeNeuronError("give at least one prompt")
    if len(prompts) < config.min_prompts:
        raise KnowledgeNeuronError(
            f"refinement needs at least {config.min_prompts} prompts, got {len(prompts)}"
        )
    adaptive = config.is_adaptive
    start_share = DEFAULT_SHARE if config.share is None else config.share
    resolved, steps, grid, threshold = config.resolved_method, config.steps, config.grid, config.threshold
    ka = KnowledgeAttribution(model, engine=config.resolved_engine)
    fingerprint = model.fingerprint
    results, one_by_one = [], prompts
    if config.batch_prompts and resolved.kind == "ig" and steps not in STEP_RULES and len(prompts) > 1:
        results = ka.attribute_prompts(prompts, target, steps=steps, batch_size=config.batch_size,
                                       progress=config.progress, grid=grid)
        one_by_one = []
    for p in one_by_one:
        results.append(method_attribution(model, resolved, p, target, steps=steps, batch_size=config.batch_size,
                                          engine=ka.engine, grid=grid, tolerance=config.tolerance,
                                          progress=config.progress, matmul_dtype=config.matmul_dtype))
    for r in results:
        if r.target_prob < LOW_PROB:
            warnings.warn(f"P({target!r} | {r.prompt!r}) = {r.target_prob:.2g} < {LOW_PROB:g}: the model does "
                          "not predict this fact, so its neurons say little about it", LowProbabilityWarning,
                          stacklevel=4)
    pick = activation_neurons if resolved.kind == "activation" else coarse_neurons
    coarse = [pick(r, threshold) for r in results]
    used_share: float | None
    if len(prompts) == 1:
        neurons, used_share = coarse[0], None
    elif adaptive:
        neurons, used_share = refine_adaptive(coarse, start_share)
    else:
        neurons, used_share = refine(coarse, start_share), start_share
    note = _note(len(neurons), len(prompts), used_share, adaptive)
    if note:
        warnings.warn(note, RefinementNote, stacklevel=4)
    return LocateResult(model.name, [r.prompt for r in results], target, neurons, coarse, results, threshold,
                        used_share, model.n_layers, model.d_mlp, resolved.name, fingerprint, adaptive and len(prompts) > 1,
                        note, model.signature)
