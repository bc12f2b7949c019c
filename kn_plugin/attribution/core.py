"""The public facade: :class:`KnowledgeAttribution`, Captum-style ``attribute`` over every layer
(or some), one prompt or several, with the engine chosen by name."""

from __future__ import annotations

import warnings

import torch
from tqdm.auto import tqdm

from kn_plugin.attribution.adaptive import ADAPTIVE_GAP_SLACK, ADAPTIVE_NEURON_TOLERANCE, ADAPTIVE_POINTS, refine
from kn_plugin.attribution.config import DEFAULT_BATCH_SIZE, AttributionResult, IGConfig, default_batch_size
from kn_plugin.attribution.engines.base import (
    AttributionEngine,
    EngineFailure,
    KnowledgeNeuronWarning,
    _check_representable,
    _clean,
    zeroed_probs,
)
from kn_plugin.attribution.engines.batched import PROMPT_BATCH_ENGINE, prompt_batch_scores
from kn_plugin.attribution.engines.registry import DEFAULT_ENGINE, get_engine
from kn_plugin.attribution.grid import AUTO_MAX_STEPS, AUTO_STEPS, AUTO_TOLERANCE, DEFAULT_GRID, STEP_RULES, check_grid
from kn_plugin.defaults import PAPER_STEPS
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.hardware import dtype_name, warn_if_slow_precision
from kn_plugin.models import wrap
from kn_plugin.scoring import encode_fact
from kn_plugin.validation import MAX_STEPS, finite, positive_int


def precision_extras(model, matmul_dtype, extras: dict) -> dict:
    """``extras`` with the dtypes an attribution ran in: the model's, and its layers' products'."""
    return {**extras, "dtype": dtype_name(model.dtype), "matmul_dtype": dtype_name(matmul_dtype or model.dtype)}


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
        self, prompt, target: str, steps: int | str = PAPER_STEPS, layers: list[int] | None = None,
        batch_size: int | None = None, progress: bool = True, layers_per_pass: int | None = None,
        grid: str = DEFAULT_GRID, tolerance: float = AUTO_TOLERANCE, max_steps: int = AUTO_MAX_STEPS,
        matmul_dtype=None, neuron_tolerance: float = ADAPTIVE_NEURON_TOLERANCE,
    ) -> AttributionResult:
        """IG scores of every neuron of the chosen layers (default: all) for one fact.

        ``prompt``: text, or token ids used as they are (see :func:`kn_plugin.encode_fact`).
        ``grid``: the integration rule (:data:`GRIDS`, Captum's names; default the paper's
        right Riemann sum). ``steps="auto"`` raises m along :data:`AUTO_STEPS` (up to
        ``max_steps``) until every layer's completeness gap is at most ``tolerance`` times
        that layer's P(full) - P(zeroed) (see :func:`worst_relative_gap`); ``result.steps`` is the
        m used, and a warning says when the cap was reached first. ``steps="adaptive"``
        (:mod:`kn_plugin.attribution.adaptive`, the converged preset :data:`CONVERGED`): each layer
        whose gap misses ``tolerance`` at 5 points is integrated by a composite rule, bisected
        until every interval's per-neuron error estimate is within ``neuron_tolerance`` x the
        largest score and the gap meets ``tolerance`` (plus 1e-4 x P(target), what a float32 sum
        resolves; at most ``max_steps`` points per layer);
        ``extras["steps_per_layer"]``/``extras["intervals"]`` say what each layer used.
        ``batch_size`` alpha steps per pass (default: the fast engines fill passes of up to
        :data:`~kn_plugin.attribution.config.PASS_ROWS` (layer, alpha) rows, the others take 10); the fast engines also batch
        ``layers_per_pass`` layers together (default: all; lower it, or ``batch_size``, to save
        memory on large models). Runs in eval
        mode without weight gradients; the model's mode and flags are restored afterwards.
        ``matmul_dtype`` (``"bfloat16"``/``"float16"``): the fast engines run the layers' matrix
        products in that dtype, the rest in the model's (see :class:`IGConfig`); where that does
        not reproduce the model's own forward within :data:`MIXED_TOLERANCE` they run without it,
        with a warning. ``extras["dtype"]``/``extras["matmul_dtype"]`` say what ran.
        """
        if batch_size is None:
            n = len(layers) if isinstance(layers, (list, tuple)) else self.model.n_layers
            if type(layers_per_pass) is int and layers_per_pass > 0:
                n = min(n, layers_per_pass)
            batch_size = default_batch_size(self.engine.pass_rows, steps, n)
        if matmul_dtype is not None:  # checked here once, for the auto ladder too
            warn_if_slow_precision(IGConfig(matmul_dtype=matmul_dtype).matmul_dtype, self.model.device)
        if isinstance(steps, str) and steps == "auto":
            return self._attribute_auto(prompt, target, layers, batch_size, progress, layers_per_pass, grid,
                                        tolerance, max_steps, matmul_dtype)
        if isinstance(steps, str) and steps not in STEP_RULES:
            raise KnowledgeNeuronError(f"steps must be a positive integer, 'auto' or 'adaptive', got {steps!r}")
        if isinstance(steps, str) and steps == "adaptive":
            return self._attribute_adaptive(prompt, target, layers, batch_size, progress, layers_per_pass, grid,
                                            tolerance, neuron_tolerance, max_steps, matmul_dtype)
        config = IGConfig(steps=steps, batch_size=batch_size,
                          layers=tuple(layers) if layers is not None else None, progress=progress,
                          layers_per_pass=layers_per_pass, grid=grid, matmul_dtype=matmul_dtype)
        model = self.model
        with model.frozen():
            fact, chosen, clean = _fact_and_clean(model, prompt, target, config.layers, self.engine.capture(model))
            activations, logp = clean.acts, clean.logp
            scores = torch.zeros(activations.shape, dtype=torch.float32)
            zeroed = torch.zeros(model.n_layers, dtype=torch.float64)
            engine, notes, ran_in = self.engine.name, [], None
            with tqdm(total=len(chosen) * config.steps, disable=not config.progress,
                      desc=f"IG {fact.prompt[:30]!r}", unit="step", leave=False) as bar:
                if chosen:
                    run = self.engine.run(model, fact, chosen, activations, config, bar, clean=clean)
                    scores[list(chosen)] = run.scores.float().cpu()
                    zeroed, engine, notes, ran_in = run.zeroed, run.engine, run.notes, run.matmul_dtype
        extras = precision_extras(model, ran_in, {"grid": config.grid})
        if notes:
            extras["engine_notes"] = notes
        return AttributionResult(
            model=model.name, prompt=fact.prompt, target=target, scores=scores,
            activations=activations.float().cpu(), target_prob=logp.exp()[0].item(),
            zeroed_prob=zeroed, layers=chosen, steps=config.steps,
            engine=engine, extras=extras,
        )

    def attribute_prompts(
        self, prompts, target: str, steps: int = PAPER_STEPS, layers: list[int] | None = None,
        batch_size: int | None = None, progress: bool = True, grid: str = DEFAULT_GRID,
    ) -> list[AttributionResult]:
        """IG scores of several prompts (a fact's paraphrases, any lengths) for one target, in
        shared full passes: each pass holds ``batch_size`` alpha steps of every prompt for one
        layer (:func:`prompt_batch_scores`; default 10 steps). Equal to :meth:`attribute` with the batched engine;
        it pays where a pass is far from saturating the device (GPUs, models without a fast
        engine). When the padded pass does not reproduce each prompt's own forward, a warning
        says so and the prompts run one at a time on this object's engine."""
        config = IGConfig(steps=steps, batch_size=DEFAULT_BATCH_SIZE if batch_size is None else batch_size,
                          layers=tuple(layers) if layers is not None else None, progress=progress, grid=grid)
        model = self.model
        with model.frozen():
            facts = [encode_fact(model, p, target) for p in prompts]
            chosen = config.layers if config.layers is not None else tuple(range(model.n_layers))
            for layer in chosen:
                model.adapter.check_layer(layer)
            cleans = [(c.acts, c.logp) for c in (_clean(model, f) for f in facts)]
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
                    steps=config.steps, engine=PROMPT_BATCH_ENGINE, extras=precision_extras(model, None, {"grid": config.grid})))
        return results

    def _attribute_adaptive(self, prompt, target, layers, batch_size, progress, layers_per_pass, grid, tolerance,
                            neuron_tolerance, max_steps, matmul_dtype) -> AttributionResult:
        tolerance, max_steps = _check_auto(tolerance, max_steps)
        neuron_tolerance = finite("neuron_tolerance", neuron_tolerance)
        if neuron_tolerance <= 0:
            raise KnowledgeNeuronError(f"neuron_tolerance must be > 0, got {neuron_tolerance:g}")
        check_grid(grid)
        if max_steps < ADAPTIVE_POINTS:
            raise KnowledgeNeuronError(f"steps='adaptive' needs max_steps >= {ADAPTIVE_POINTS}, got {max_steps}")
        if not self.engine.gives_gradients:
            raise KnowledgeNeuronError(f"steps='adaptive' needs per-point gradients, which the {self.engine.name} "
                                       "engine does not give: use engine fast, stepper, cached or batched")
        model = self.model
        with model.frozen():
            fact, chosen, clean = _fact_and_clean(model, prompt, target, layers, self.engine.capture(model))
            activations, full_prob = clean.acts, clean.logp.exp()[0].item()
            scores = torch.zeros(activations.shape, dtype=torch.float32)
            zeroed = torch.zeros(model.n_layers, dtype=torch.float64)
            per_layer, intervals, notes, engine, ran_in, capped = {}, {}, [], self.engine.name, None, []
            if chosen:
                config = IGConfig(steps=ADAPTIVE_POINTS, batch_size=batch_size, layers=chosen, progress=progress,
                                  layers_per_pass=layers_per_pass, grid=grid, matmul_dtype=matmul_dtype)
                with tqdm(total=len(chosen) * ADAPTIVE_POINTS, disable=not progress, unit="step", leave=False,
                          desc=f"IG {fact.prompt[:30]!r} adaptive") as bar:
                    run = self.engine.run(model, fact, chosen, activations, config, bar, clean=clean)
                    zeroed, notes, engine, ran_in = run.zeroed, list(run.notes), run.engine, run.matmul_dtype
                    first = dict(zip(chosen, run.scores.float().cpu()))
                    effect = {layer: abs(full_prob - zeroed[layer].item()) for layer in chosen}
                    floor = max(max(effect.values()) * 1e-3, 1e-12)

                    def gap_ok(layer, value):  # within tolerance of the effect, or below float32's resolution
                        return abs(value.sum().item() - (full_prob - zeroed[layer].item())) <= tolerance * max(
                            effect[layer], floor) + ADAPTIVE_GAP_SLACK * full_prob

                    pending = [layer for layer in chosen if not gap_ok(layer, first[layer])]
                    if pending and run.gradients is None:
                        raise KnowledgeNeuronError(f"steps='adaptive': the {run.engine} engine gave no per-point "
                                                   "gradients to refine with")
                    bar.total = None
                    refined = refine(first, pending, run.gradients, activations, grid, gap_ok, neuron_tolerance,
                                     max_steps, bar) if pending else {}
                for layer in chosen:
                    r = refined.get(layer)
                    scores[layer] = (r.value if r else first[layer]).float()
                    per_layer[layer] = r.points if r else ADAPTIVE_POINTS
                    if r:
                        intervals[layer] = [[iv.lo, iv.hi] for iv in r.intervals]
                        if r.capped or not gap_ok(layer, r.value):
                            capped.append(layer)
        result = AttributionResult(
            model=model.name, prompt=fact.prompt, target=target, scores=scores,
            activations=activations.float().cpu(), target_prob=full_prob, zeroed_prob=zeroed, layers=chosen,
            steps=max(per_layer.values(), default=ADAPTIVE_POINTS), engine=engine,
            extras=precision_extras(model, ran_in, {"grid": grid, "rule": "adaptive"}))
        if notes:
            result.extras["engine_notes"] = notes
        result.extras["steps_per_layer"] = [per_layer.get(layer) for layer in range(model.n_layers)]
        result.extras["intervals"] = {str(layer): ivs for layer, ivs in intervals.items()}
        result.extras["evaluations_per_layer"] = [
            (refined[layer].evaluations if layer in refined else ADAPTIVE_POINTS) if layer in per_layer else None
            for layer in range(model.n_layers)] if chosen else []
        if capped:
            warnings.warn(f"steps='adaptive' stopped at max_steps={max_steps} points for layer(s) "
                          f"{', '.join(map(str, capped))} before meeting its tolerances ({grid})",
                          KnowledgeNeuronWarning, stacklevel=3)
        return result

    def _attribute_auto(self, prompt, target, layers, batch_size, progress, layers_per_pass, grid, tolerance,
                        max_steps, matmul_dtype) -> AttributionResult:
        tolerance, max_steps = _check_auto(tolerance, max_steps)
        ladder = [m for m in AUTO_STEPS if m < max_steps] + [max_steps]
        if check_grid(grid) == "riemann_trapezoid":
            if max_steps < 2:
                raise KnowledgeNeuronError("the trapezoid rule needs max_steps >= 2")
            ladder = [m for m in ladder if m >= 2]
        # per layer: a layer leaves the ladder at the first m whose gap meets the tolerance, so
        # layers with a smooth path do not pay for one with a step in it (IG of a layer does not
        # depend on the other layers: each row equals attribute(steps=m) of that layer alone).
        # The clean pass, the engine's preparation and its self-check run once, on the first
        # rung; later rungs integrate only the pending layers (EngineRun.resume).
        model = self.model
        with model.frozen():
            fact, chosen, clean = _fact_and_clean(model, prompt, target, layers, self.engine.capture(model))
            activations, full_prob = clean.acts, clean.logp.exp()[0].item()
            scores = torch.zeros(activations.shape, dtype=torch.float32)
            zeroed = torch.zeros(model.n_layers, dtype=torch.float64)
            pending, run, floor, per_layer, engines, notes = chosen, None, None, {}, [], []
            tried = [] if chosen else [(ladder[0], 0.0)]
            def in_pass(n):  # layers that share one pass
                return min(n, layers_per_pass or n)

            rows = in_pass(len(chosen)) * min(batch_size, ladder[0])  # rows per pass of the first rung
            for m in ladder:
                if not pending:
                    break
                # later rungs hold fewer layers: more alpha steps per pass keep the products as large
                # (and the memory as bounded) as the first rung's, instead of many small passes
                chunk = batch_size if run is None else min(m, max(batch_size, rows // in_pass(len(pending))))
                config = IGConfig(steps=m, batch_size=chunk, layers=pending, progress=progress,
                                  layers_per_pass=layers_per_pass, grid=grid, matmul_dtype=matmul_dtype)
                with tqdm(total=len(pending) * m, disable=not progress, desc=f"IG {fact.prompt[:30]!r} m={m}",
                          unit="step", leave=False) as bar:
                    if run is None:
                        run = self.engine.run(model, fact, pending, activations, config, bar, clean=clean)
                        zeroed, notes = run.zeroed, list(run.notes)
                    elif run.resume is not None:
                        run = run.resume(pending, config, bar)
                        notes += run.notes
                    else:
                        run = self.engine.run(model, fact, pending, activations, config, bar, clean=clean)
                        notes += run.notes
                engines.append(run.engine)
                rung = run.scores.float().cpu()
                effect = (full_prob - zeroed[list(pending)]).abs()
                if floor is None:  # 1e-3 of the largest layer effect (as layer_effect_floor)
                    floor = max(effect.max().item() * 1e-3, 1e-12)
                gaps = {layer: (abs(rung[r].sum().item() - (full_prob - zeroed[layer].item()))
                                / max(effect[r].item(), floor)) for r, layer in enumerate(pending)}
                tried.append((m, max(gaps.values(), default=0.0)))
                for r, layer in enumerate(pending):
                    if gaps[layer] <= tolerance or m == ladder[-1]:
                        per_layer[layer] = m
                        scores[layer] = rung[r]
                pending = tuple(layer for layer in pending if layer not in per_layer)
        first = AttributionResult(
            model=model.name, prompt=fact.prompt, target=target, scores=scores,
            activations=activations.float().cpu(), target_prob=full_prob, zeroed_prob=zeroed, layers=chosen,
            steps=ladder[0], engine=engines[0] if engines else self.engine.name,
            extras=precision_extras(model, run.matmul_dtype if run is not None else None, {"grid": grid}))
        if notes:
            first.extras["engine_notes"] = notes
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


def _check_auto(tolerance, max_steps) -> tuple[float, int]:
    """The checked ``tolerance`` and ``max_steps`` of ``steps="auto"``/``"adaptive"``."""
    tolerance = finite("tolerance", tolerance)
    if tolerance <= 0:
        raise KnowledgeNeuronError(f"tolerance must be > 0, got {tolerance:g}")
    max_steps = positive_int("max_steps", max_steps)
    if max_steps > MAX_STEPS:
        raise KnowledgeNeuronError(f"max_steps must be at most {MAX_STEPS:,}, got {max_steps:,}")
    return tolerance, max_steps


def _fact_and_clean(model, prompt, target: str, layers, capture=None) -> tuple:
    """Inside ``model.frozen()``: the encoded fact, the attributed layers (all when None; each
    checked), and the model's own clean forward (:class:`CleanPass`, with what ``capture`` asks)."""
    fact = encode_fact(model, prompt, target)
    chosen = tuple(layers) if layers is not None else tuple(range(model.n_layers))
    for layer in chosen:
        model.adapter.check_layer(layer)
    clean = _clean(model, fact, capture)
    _check_representable(model, fact, clean.logp)
    return fact, chosen, clean
