"""Engines that take shortcuts and prove them: each result is checked against the model's own
forward before it is trusted, and the batched engine takes over (with one warning) when not."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import warnings
from abc import abstractmethod
from collections.abc import Sequence

import torch

from kn_plugin.attribution.config import MIXED_TOLERANCE, PASS_ROWS, EngineRun
from kn_plugin.attribution.engines.base import (
    VERIFY_TOLERANCE,
    AttributionEngine,
    CleanPass,
    EngineFailure,
    KnowledgeNeuronWarning,
    _clean,
    _finish,
    _grid,
    _weighted_sum,
    phase,
    zeroed_log_probs,
)
from kn_plugin.attribution.engines.batched import BatchedEngine
from kn_plugin.hardware import dtype_name
from kn_plugin.models import LoadedModel
from kn_plugin.scoring import EncodedFact

logger = logging.getLogger(__name__)


class VerifiedEngine(AttributionEngine):
    """A shortcut that proves itself on every fact before its scores are trusted.

    The engine computes log P(target) with each attributed layer's activation zeroed
    (alpha = 0) and, from the lowest attributed layer up, kept (alpha = 1), and compares them
    with the model's own forward (:func:`zeroed_log_probs` and the clean pass). These rows ride
    along in the first pass of each group of layers the integration runs (or, before a
    mixed-precision integration, in a pass of their own). A difference above
    :data:`VERIFY_TOLERANCE` (a mismatch) or any exception falls back to the batched engine
    with one warning; the result records the engine that actually ran.
    """

    pass_rows = PASS_ROWS

    def applicable(self, model: LoadedModel) -> bool:
        return True

    @abstractmethod
    def prepare(self, model: LoadedModel, fact: EncodedFact, clean: CleanPass):
        """Whatever :meth:`log_probs` reuses across passes (a cache of the clean prefix), from
        ``clean`` where it holds what this engine's :meth:`capture` asked for."""

    @abstractmethod
    def log_probs(self, model: LoadedModel, state, fact: EncodedFact, layers: tuple[int, ...],
                  activations: torch.Tensor, alphas: torch.Tensor) -> tuple[torch.Tensor, list]:
        """log P(target) for every (layer, alpha) row, layer-major over the sorted ``layers``,
        with the patched activation ``alpha * a`` as a leaf per layer (requires grad when grad
        mode is on)."""

    def run(self, model, fact, layers, activations, config, bar, clean=None):
        return run_chain([self], model, fact, layers, activations, config, bar, clean)

    def reference_zeroed(self, model, fact, layers, activations, clean: CleanPass) -> torch.Tensor:
        """[len(layers)] log P(target) with each layer zeroed, from the model's own forward."""
        return zeroed_log_probs(model, fact, layers)

    def run_verified(self, model, fact, layers, activations, config, bar, clean=None) -> EngineRun:
        if clean is None:
            clean = _clean(model, fact, self.capture(model))
        with phase("reference"):
            ref_zeroed = self.reference_zeroed(model, fact, layers, activations, clean)
        notes = []
        try:
            with phase("prepare"):
                state = self.prepare(model, fact, clean)
            check = _SelfCheck(self.name, layers, ref_zeroed, clean.logp, activations,
                               VERIFY_TOLERANCE.get(model.dtype, 0.1))
            if config.matmul_dtype is not None and config.matmul_dtype != model.dtype:
                try:
                    self.verify(model, state, fact, activations,
                                dataclasses.replace(check, tol=MIXED_TOLERANCE[config.matmul_dtype]),
                                config.matmul_dtype)
                    check = None  # verified in the dtype the integration runs in
                except EngineFailure as exc:  # precision, not the engine: the same engine without it
                    note = f"{self.name} engine with {dtype_name(config.matmul_dtype)} matmuls: {exc}"
                    warnings.warn(f"{model.name}: {note}; running them in {dtype_name(model.dtype)}",
                                  KnowledgeNeuronWarning, stacklevel=5)
                    notes.append(note)
                    config = dataclasses.replace(config, matmul_dtype=None)
            else:
                config = dataclasses.replace(config, matmul_dtype=None)
            with phase("integrate"):
                scores = self.integrate(model, state, fact, layers, activations, config, bar, check)
        except EngineFailure:
            raise
        except Exception as exc:  # any exception inside a shortcut: fall back, loudly
            raise EngineFailure(f"{self.name} engine raised {type(exc).__name__}: {exc}") from exc
        zeroed = torch.zeros(model.n_layers, dtype=torch.float64)
        zeroed[list(layers)] = ref_zeroed.exp()
        return self._verified_run(model, state, fact, activations, zeroed, config, scores, layers, notes)

    def _verified_run(self, model, state, fact, activations, zeroed, config, scores, layers, notes=()) -> EngineRun:
        """``scores`` as an :class:`EngineRun` whose ``resume`` and ``gradients`` reuse the verified
        ``state``; ``gradients`` runs passes as large as this run's (layers per pass x batch size)."""
        rows = min(len(layers), config.layers_per_pass or len(layers)) * config.batch_size
        return EngineRun(scores, zeroed, self.name, list(notes), matmul_dtype=config.matmul_dtype,
                         resume=functools.partial(self._resume, model, state, fact, activations, zeroed,
                                                  config.matmul_dtype),
                         gradients=functools.partial(self._gradients, model, state, fact, activations, zeroed,
                                                     config.matmul_dtype, max(rows, config.batch_size)))

    def _fallback(self, model, exc, stacklevel=4) -> str:
        note = f"{self.name} engine raised {type(exc).__name__}: {exc}"
        warnings.warn(f"{model.name}: {note}; using the batched engine", KnowledgeNeuronWarning, stacklevel=stacklevel)
        return note

    def _resume(self, model, state, fact, activations, zeroed, matmul_dtype, layers, config, bar) -> EngineRun:
        """Integrate ``layers`` again (a subset of the verified ones) with ``config``, in the
        matmul dtype that verified; an exception falls back to the batched engine, loudly."""
        config = dataclasses.replace(config, matmul_dtype=matmul_dtype)
        try:
            with phase("integrate"):
                scores = self.integrate(model, state, fact, layers, activations, config, bar)
        except Exception as exc:  # any exception inside a shortcut: fall back, loudly
            note = self._fallback(model, exc)
            return BatchedEngine().run(model, fact, layers, activations, config, bar, notes=[note], zeroed=zeroed)
        return self._verified_run(model, state, fact, activations, zeroed, config, scores, layers)

    @phase("refine")
    def _gradients(self, model, state, fact, activations, zeroed, matmul_dtype, max_rows, points, bar):
        """dP(target)/dx at ``x = alpha * a`` for explicit points per layer (``{layer: alphas}``
        -> ``{layer: [len(alphas), d_mlp]}`` float32), in passes of at most ``max_rows`` rows;
        an exception falls back to the batched engine, loudly."""
        try:
            out = {layer: [] for layer in points}
            for chunk in _row_chunks(points, max_rows):
                layers = tuple(sorted(chunk))
                alphas = [chunk[layer].to(activations.dtype).to(activations.device) for layer in layers]
                _, grads = self._point_grads(model, state, fact, layers, activations, alphas, matmul_dtype)
                for layer, g in zip(layers, grads):
                    out[layer].append(g.float())
                bar.update(sum(len(a) for a in alphas))
            return {layer: torch.cat(parts) for layer, parts in out.items()}
        except Exception as exc:  # any exception inside a shortcut: fall back, loudly
            self._fallback(model, exc)
            return BatchedEngine().gradients(model, fact, activations, points, bar)

    @torch.no_grad()
    @phase("verify")
    def verify(self, model, state, fact, activations, check: _SelfCheck, matmul_dtype=None) -> None:
        """The self-check in a pass of its own: every layer zeroed (alpha = 0), and the lowest
        layer kept (alpha = 1: the rows joining there run every layer above it, so this row is
        the whole clean forward)."""
        ordered = tuple(sorted(check.points))
        with _matmuls(activations.device, matmul_dtype):
            logp, _ = self.log_probs(model, state, fact, ordered, activations, [check.points[ly] for ly in ordered])
        check.compare(dict(zip(ordered, logp.split([len(check.points[ly]) for ly in ordered]))))

    def integrate(self, model, state, fact, layers, activations, config, bar, check: _SelfCheck | None = None):
        """The IG scores ([len(layers), d_mlp]); with ``check``, its rows join the first pass of
        each group of layers and the run raises :class:`EngineFailure` before going on if
        they do not reproduce the model's forward."""
        alphas, weights = _grid(config, activations)
        w_chunks = weights.split(config.batch_size) if weights is not None else [None] * len(alphas)
        grad_sum = {layer: torch.zeros(activations.shape[1], dtype=torch.float32, device=activations.device)
                    for layer in layers}
        for group in _layer_groups(layers, config.layers_per_pass):
            for i, (chunk, w) in enumerate(zip(alphas.split(config.batch_size), w_chunks)):
                extra = check.points if check is not None and i == 0 else {}
                points = [torch.cat([chunk, extra[layer]]) if layer in extra else chunk for layer in group]
                logp, grads = self._point_grads(model, state, fact, group, activations, points, config.matmul_dtype)
                if extra:
                    rows = logp.split([len(p) for p in points])
                    check.compare({layer: r[len(chunk):] for layer, r in zip(group, rows)})
                for layer, g in zip(group, grads):
                    grad_sum[layer] += _weighted_sum(g[:len(chunk)], w)
                bar.update(len(chunk) * len(group))
        return torch.stack([_finish(activations[layer], grad_sum[layer], config, weights is not None)
                            for layer in layers])

    def _point_grads(self, model, state, fact, layers, activations, alphas, matmul_dtype) -> tuple:
        """log P(target) of every (layer, alpha) row of one pass (detached), and dP(target)/dx
        per layer ([rows of that layer, d_mlp])."""
        with torch.enable_grad(), _matmuls(activations.device, matmul_dtype):
            logp, leaves = self.log_probs(model, state, fact, layers, activations, alphas)
            # at least float32: under autocast the model's own head may return bf16/fp16
            logp = logp.to(torch.promote_types(logp.dtype, torch.float32))
            return logp.detach(), torch.autograd.grad(logp.exp().sum(), leaves)


@dataclasses.dataclass(frozen=True)
class _SelfCheck:
    """What a shortcut's rows must reproduce of the model's own forward: log P(target) with each
    attributed layer zeroed (alpha = 0) and, at the lowest attributed layer, kept (alpha = 1)."""

    engine: str
    layers: tuple[int, ...]
    ref_zeroed: torch.Tensor  # [len(layers)] float64, aligned with ``layers``
    clean_logp: torch.Tensor  # [1]
    like: torch.Tensor  # the activations: the dtype and device of the alphas
    tol: float

    @property
    def points(self) -> dict[int, torch.Tensor]:
        """The check's alphas per layer."""
        lowest = min(self.layers)
        return {layer: torch.tensor([0.0, 1.0] if layer == lowest else [0.0], dtype=self.like.dtype,
                                    device=self.like.device) for layer in self.layers}

    def compare(self, got: dict[int, torch.Tensor]) -> None:
        """Raise :class:`EngineFailure` (a mismatch) when a row of ``got`` ({layer: log P at its
        points}) differs from the model's forward by more than ``tol``."""
        zeroed = dict(zip(self.layers, self.ref_zeroed.tolist()))
        clean = self.clean_logp.double().cpu().item()
        err = 0.0
        for layer, logp in got.items():
            expected = torch.tensor([zeroed[layer]] + [clean] * (len(logp) - 1), dtype=torch.float64)
            err = max(err, (logp.double().cpu() - expected).abs().nan_to_num(nan=float("inf")).max().item())
        if err > self.tol:
            raise EngineFailure(
                f"{self.engine} engine differs from the model's own forward by {err:.2g} in log P(target) "
                f"(tolerance {self.tol:g})", mismatch=True,
            )


def _matmuls(device: torch.device, dtype: torch.dtype | None):
    """Autocast of the layers' products to ``dtype`` (a no-op context for None)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def per_layer_alphas(alphas, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """``{layer: alphas}`` in the order of ``layers``: one tensor shared by every layer, or a
    list of tensors aligned with ``layers`` (each layer its own points)."""
    if isinstance(alphas, torch.Tensor):
        return {layer: alphas for layer in layers}
    if len(alphas) != len(layers):
        raise ValueError(f"{len(alphas)} alpha tensors for {len(layers)} layers")
    return dict(zip(layers, alphas))


def _leaf(alphas: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    x = alphas[:, None] * a[None]  # [b, d_mlp]
    return x.requires_grad_(True) if torch.is_grad_enabled() else x


def _row_chunks(points: dict[int, torch.Tensor], max_rows: int) -> list[dict[int, torch.Tensor]]:
    """``points`` split into passes of at most ``max_rows`` (layer, alpha) rows, a layer at most once per pass."""
    passes, current, room = [], {}, max_rows
    for layer in sorted(points):
        alphas = points[layer]
        while len(alphas):
            if room == 0 or layer in current:
                passes.append(current)
                current, room = {}, max_rows
            current[layer], alphas = alphas[:room], alphas[room:]
            room -= len(current[layer])
    if current:
        passes.append(current)
    return passes


def _layer_groups(layers: tuple[int, ...], size: int | None) -> list[tuple[int, ...]]:
    ordered = tuple(sorted(layers))
    size = size or len(ordered)
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def run_chain(candidates: Sequence[VerifiedEngine], model, fact, layers, activations, config, bar,
              clean=None) -> EngineRun:
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
            run = engine.run_verified(model, fact, layers, activations, config, bar, clean)
            run.notes = notes + run.notes
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
