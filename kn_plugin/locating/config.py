"""The settings of :func:`~kn_plugin.locating.core.locate`, checked once at the public entry
(as Captum validates in ``attribute``): a frozen :class:`LocateConfig` holding the resolved
method and engine, so that nothing below re-resolves them."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from kn_plugin.attribution import (
    AUTO_TOLERANCE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_ENGINE,
    DEFAULT_GRID,
    STEP_RULES,
    AttributionEngine,
    IGConfig,
    get_engine,
)
from kn_plugin.attribution.methods import Method, method_identity, resolve_method
from kn_plugin.defaults import PAPER_STEPS
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.hardware import dtype_name
from kn_plugin.locating.select import DEFAULT_THRESHOLD, check_fraction


@dataclass(frozen=True)
class LocateConfig:
    """What :func:`~kn_plugin.locating.core.locate` is asked for (its keyword arguments).

    ``adaptive=None`` means: adaptive unless ``share`` is given. ``resolved_method`` and
    ``resolved_engine`` are the objects ``method`` and ``engine`` name, made once here."""

    steps: int | str = PAPER_STEPS
    threshold: float = DEFAULT_THRESHOLD
    share: float | None = None
    adaptive: bool | None = None
    min_prompts: int = 1
    method: Any = "ig"
    engine: Any = DEFAULT_ENGINE
    #: alpha steps per pass (None: the engine's choice, see :meth:`KnowledgeAttribution.attribute`)
    batch_size: int | None = None
    progress: bool = True
    grid: str = DEFAULT_GRID
    tolerance: float = AUTO_TOLERANCE
    batch_prompts: bool = False
    #: IG on the fast engines: the layers' products in this dtype (see :class:`~kn_plugin.attribution.IGConfig`)
    matmul_dtype: Any = None
    resolved_method: Method = field(init=False, repr=False, compare=False)
    resolved_engine: AttributionEngine = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        check_fraction("threshold", self.threshold)
        if self.share is not None:
            check_fraction("share", self.share)
        method = resolve_method(self.method)
        object.__setattr__(self, "resolved_method", method)
        object.__setattr__(self, "resolved_engine", get_engine(self.engine))
        steps = self.steps
        if method.kind != "ig" and not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
            raise KnowledgeNeuronError(f"steps must be a positive integer for method {method.name}, got {steps!r}")
        ig = IGConfig(steps=PAPER_STEPS if steps in STEP_RULES else steps, grid=self.grid,
                      batch_size=DEFAULT_BATCH_SIZE if self.batch_size is None else self.batch_size,
                      matmul_dtype=self.matmul_dtype)
        object.__setattr__(self, "matmul_dtype", ig.matmul_dtype)  # the torch dtype it names

    @classmethod
    def from_options(cls, options: dict) -> LocateConfig:
        """From a dict of locate options (``locate_many``, the CLI); an unknown name is a one-line error."""
        allowed = {f.name for f in fields(cls) if f.init} - {"progress"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise KnowledgeNeuronError(f"unknown locate options {unknown}: choose from {sorted(allowed)}")
        return cls(**options)

    @property
    def is_adaptive(self) -> bool:
        return self.share is None if self.adaptive is None else bool(self.adaptive)

    def identity(self) -> dict:
        """What a result folder records of these settings: every one but ``progress``, as given,
        with the method and engine by name (:func:`~kn_plugin.attribution.methods.method_identity`)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.init and f.name != "progress"}
        out["method"] = method_identity(self.method)
        out["engine"] = self.resolved_engine.name
        if self.batch_size is None:  # the engine's choice: an explicit size is recorded as given
            del out["batch_size"]
        if self.matmul_dtype is None:  # folders written before the option existed resume unchanged
            del out["matmul_dtype"]
        else:
            out["matmul_dtype"] = dtype_name(self.matmul_dtype)
        return out
