"""The settings of ``kn bench pararel`` and the facts a run uses: PARAREL relations the model can
be tested on, a seeded draw per relation, the prompts each fact is located on."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from functools import cached_property

from kn_plugin import paper
from kn_plugin.attribution import AUTO_TOLERANCE, STEP_RULES
from kn_plugin.data import PAPER_ERASE_RELATIONS, load_pararel
from kn_plugin.defaults import PAPER_STEPS
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.locating import LocateConfig
from kn_plugin.models import LoadedModel


@dataclass(frozen=True)
class ParaRelConfig:
    """Checked settings of ``kn bench pararel`` (the data selection, relations and facts per
    relation, is not part of them: a larger draw of the same run reuses its records)."""

    steps: int | str = PAPER_STEPS
    grid: str = "riemann_right"
    tolerance: float = AUTO_TOLERANCE  # steps="auto": the completeness gap each layer must reach
    batch_size: int = 10
    max_rank: int = 10  # a prompt "knows" the fact when the object's first token ranks below this
    min_known: float = 0.5  # a fact counts when that holds for at least this share of its prompts
    locate_prompts: int = 3  # k prompts locate the neurons; the others are held out
    threshold: float = paper.IG_THRESHOLD
    base_threshold: float = paper.BASE_THRESHOLD
    share: float = paper.START_SHARE
    min_sharing: int = paper.MIN_SHARING
    random_draws: int = 3
    update_facts: int = 10
    lambda1: float = 1.0
    lambda2: float = 8.0
    controls: int = 5  # facts of the same / of other relations measured around each update
    erase_relations: tuple[str, ...] = PAPER_ERASE_RELATIONS
    erase_top: int = paper.ERASE_TOP
    erase_others: int = 50
    seed: int = 0
    engine: str = "fast"

    def __post_init__(self):
        if self.steps not in STEP_RULES and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                             or self.steps < 1):
            raise KnowledgeNeuronError(f"steps must be a positive integer, 'auto' or 'adaptive', got {self.steps!r}")
        self.locate  # noqa: B018 - the locate settings, checked once here
        for name in ("batch_size", "max_rank", "random_draws", "min_sharing", "erase_top", "controls"):
            if getattr(self, name) < 1:
                raise KnowledgeNeuronError(f"{name.replace('_', ' ')} must be >= 1")
        if self.locate_prompts < self.min_sharing:
            raise KnowledgeNeuronError(f"--locate-prompts {self.locate_prompts} is below the {self.min_sharing} "
                                       "prompts a refined neuron must be shared by")
        for name in ("min_known", "threshold", "base_threshold", "share"):
            if not 0 < getattr(self, name) <= 1:
                raise KnowledgeNeuronError(f"{name.replace('_', ' ')} must be in (0, 1], got {getattr(self, name)}")
        if self.update_facts < 0 or self.erase_others < 0:
            raise KnowledgeNeuronError("update facts and erase others must be >= 0")

    @cached_property
    def locate(self) -> LocateConfig:
        """How each fact's locate prompts are attributed and refined (fixed start share, no
        adaptive tuning: the run tunes p per relation afterwards)."""
        return LocateConfig(steps=self.steps, grid=self.grid, tolerance=self.tolerance, share=self.share,
                            adaptive=False, batch_size=self.batch_size, engine=self.engine, progress=False)

    @property
    def min_prompts(self) -> int:
        """Usable prompts a fact needs: the locate prompts and at least one held out."""
        return self.locate_prompts + 1


def content_hash(*parts) -> str:
    """Identity of a record's inputs: a record is reused only for the same inputs."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _r(x: float) -> float:
    return float(f"{x:.6g}")


def draw_facts(data: dict, facts_per_relation: int | None, seed: int) -> dict:
    """Per relation a seeded shuffle of its facts, the first ``facts_per_relation`` kept (in
    file order): the draw of n facts is part of the draw of n + 1, so growing a run reuses it."""
    out = {}
    for rel, facts in data.items():
        order = list(range(len(facts)))
        random.Random(f"{seed}-{rel}").shuffle(order)
        keep = sorted(order[:facts_per_relation] if facts_per_relation is not None else order)
        out[rel] = [facts[i] for i in keep]
    return out


def pararel_protocol_data(model: LoadedModel, folder, relations: list[str] | None,
                          facts_per_relation: int | None, config: ParaRelConfig) -> dict:
    """The facts a run uses: PARAREL relations with more than 3 templates and at least
    ``config.min_prompts`` usable prompts (k to locate, one or more held out), objects of one
    token (as the paper's BERT vocabulary), then ``facts_per_relation`` drawn per relation.

    A relation asked for by name that cannot be used is a one-line error (naming why)."""
    if facts_per_relation is not None and facts_per_relation < 1:
        raise KnowledgeNeuronError(f"facts per relation must be >= 1, got {facts_per_relation}")
    if relations is not None and len(set(relations)) != len(relations):
        raise KnowledgeNeuronError(f"relations given twice: {sorted({r for r in relations if relations.count(r) > 1})}")
    try:
        data = load_pararel(folder, relations, masked=model.is_masked,
                            mask_token=model.tokenizer.mask_token if model.is_masked else None,
                            min_prompts=config.min_prompts, tokenizer=model.tokenizer, single_token=True)
    except KnowledgeNeuronError as exc:
        if relations is None or "no PARAREL relation is usable" not in str(exc):
            raise
        data = {}  # every relation asked for is unusable: named below
    if relations is not None:
        missing = [r for r in relations if r not in data]
        if missing:
            raise KnowledgeNeuronError(
                f"relations {missing} have no usable fact: each needs {config.min_prompts} usable prompts "
                f"(--locate-prompts {config.locate_prompts} + 1 held out) and one-token objects; "
                "lower --locate-prompts or drop them")
    return draw_facts(data, facts_per_relation, config.seed)


def locate_indices(key: str, n_prompts: int, k: int, seed: int) -> list[int]:
    """The ``k`` prompts that locate a fact's neurons, drawn per fact with the seed."""
    return sorted(random.Random(f"{seed}-{key}-locate").sample(range(n_prompts), k))
