"""The editors ``kn bench edits`` compares, by name: the knowledge-neuron update as the paper, as
the authors' code, calibrated and constrained, and the rank-one editor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kn_plugin.editing import constrained_update, update_fact
from kn_plugin.rome import RomeConfig, rome_edit


@dataclass
class RomeSetup:
    """What the corpus-based editors need, made once per run: the corpus; for the rank-one
    editor its layer, key statistics and prefixes (None when no rank-one edit is computed)."""

    corpus: list[str]
    keys: object = None  # CorpusKeys of the first constrained_texts texts (kn-constrained)
    layer: int | None = None
    stats: object = None
    prefixes: list[str] | None = None


def _kn_paper(model, case, config, rome):
    return update_fact(model, [tuple(n) for n in case["neurons"]], case["target_true"], case["target_new"],
                       lambda1=config.lambda1, lambda2=config.lambda2)


def _kn_authors(model, case, config, rome):
    if not case["kept"]:
        return "every neuron is in more than 10% of the relation's sets"
    return update_fact(model, [tuple(n) for n in case["kept"]], case["target_true"], case["target_new"],
                       lambda1=config.lambda1, lambda2=config.lambda2, scale="norm",
                       prompts=case["locate_prompts"])


def _kn_calibrated(model, case, config, rome):
    return update_fact(model, [tuple(n) for n in case["neurons"]], case["target_true"], case["target_new"],
                       prompts=case["locate_prompts"])


def _kn_constrained(model, case, config, rome: RomeSetup):
    return constrained_update(model, [tuple(n) for n in case["neurons"]], case["target_true"], case["target_new"],
                              case["locate_prompts"], rome.keys)[0]


def _rome(model, case, config, rome: RomeSetup):
    return rome_edit(model, case["prompt"], case["subject"], case["target_new"], rome.layer, rome.stats,
                     rome.prefixes, RomeConfig(steps=config.rome_steps), old_target=case["target_true"])


#: the editors that read the corpus
CORPUS_EDITORS = ("kn-constrained", "rome")


#: edit methods by name: ``fn(model, case, config, rome_setup)`` -> a WeightEdit, or why none is made
EDITORS: dict[str, Callable] = {
    "kn-paper": _kn_paper,
    "kn-authors": _kn_authors,
    "kn-calibrated": _kn_calibrated,
    "kn-constrained": _kn_constrained,
    "rome": _rome,
}
