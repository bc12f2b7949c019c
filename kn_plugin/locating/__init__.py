"""Locating knowledge neurons: the paper's selection rules (:mod:`~kn_plugin.locating.select`),
``locate`` for one fact (:mod:`~kn_plugin.locating.core`) with its settings checked once
(:mod:`~kn_plugin.locating.config`), its result and files
(:mod:`~kn_plugin.locating.result`), and many facts per call, resumable (:mod:`~kn_plugin.locating.many`)."""

from kn_plugin.locating.config import LocateConfig
from kn_plugin.locating.core import locate, locate_quietly, locate_with
from kn_plugin.locating.many import (
    ResultFolder,
    check_locate_options,
    fact_key,
    keyed_facts,
    locate_many,
    locate_task,
    run_signature,
)
from kn_plugin.locating.result import (
    LOW_PROB,
    RESULT_FORMAT,
    LocateResult,
    LowProbabilityWarning,
    RefinementNote,
    read_neurons_file,
    scores_path,
)
from kn_plugin.locating.select import (
    ADAPTIVE_RANGE,
    ADAPTIVE_STEP,
    DEFAULT_SHARE,
    DEFAULT_THRESHOLD,
    Neuron,
    activation_neurons,
    check_fraction,
    coarse_neurons,
    refine,
    refine_adaptive,
)

__all__ = [
    "ADAPTIVE_RANGE", "ADAPTIVE_STEP", "DEFAULT_SHARE", "DEFAULT_THRESHOLD", "LOW_PROB", "LocateConfig", "LocateResult",
    "LowProbabilityWarning", "Neuron", "RESULT_FORMAT", "RefinementNote", "ResultFolder",
    "activation_neurons", "check_fraction", "check_locate_options", "coarse_neurons", "fact_key",
    "keyed_facts", "locate", "locate_many", "locate_quietly", "locate_with", "locate_task", "read_neurons_file", "refine",
    "refine_adaptive", "run_signature", "scores_path",
]
