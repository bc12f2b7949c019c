"""The paper's definitions where its text leaves them open, as the authors' released code
(Hunter-DDM/knowledge-neurons, src/1-7) fixes them, as functions on plain records.

* coarse set (src/2): neurons whose value is ``>= t x`` the prompt's largest value
  (IG: t = 0.2; the activation baseline ``base_kn``: t = 0.5 on raw FFN activations);
* refined set of a fact (a "bag" of paraphrases): neurons in ``>= max(p x n, 3)`` of its n
  coarse sets; p is tuned **per relation**, from 0.7 in steps of 0.05 (at most 6 tries),
  until the relation's *mean* set size lies in 2-5 (:func:`tune_relation`);
* relative change (src/3, src/8): within a relation the ratio of means over all its prompts,
  ``mean(after - before) / mean(before)``; the headline is the mean over relations;
* update (src/6): only prompts the model answers correctly before the edit count; change =
  top-1 is no longer the old object, success = top-1 is the new one; neurons counted (with
  the released code's off-by-one) in more than 10% of the relation's bags are left alone;
* erase (src/7): the 20 neurons most common among the relation's refined sets, value slots
  set to zero (the paper's text says the ``[UNK]`` embedding).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

from kn_plugin.errors import KnowledgeNeuronError

IG_THRESHOLD = 0.2
BASE_THRESHOLD = 0.5
START_SHARE = 0.7
SHARE_STEP = 0.05
MIN_SHARING = 3
KEEP = (2, 5)
MAX_TRIES = 6
UPDATE_MAX_SHARE = 0.1
ERASE_TOP = 20

Neuron = tuple[int, int]


def coarse_set(values: torch.Tensor, threshold: float) -> list[Neuron]:
    """``(layer, index)`` of every neuron with ``value >= threshold x max(values)`` (none
    when the maximum is not positive), sorted; ``values``: [n_layers, d_mlp]."""
    top = float(values.max())
    if top <= 0:
        return []
    return [(int(layer), int(i)) for layer, i in (values >= threshold * top).nonzero().tolist()]


def bag_neurons(coarse_sets: Sequence[Iterable], share: float, min_sharing: int = MIN_SHARING) -> list[Neuron]:
    """Neurons in at least ``max(share x n, min_sharing)`` of the ``n`` coarse sets, sorted."""
    need = max(share * len(coarse_sets), min_sharing)
    counts = Counter(tuple(n) for s in coarse_sets for n in {tuple(x) for x in s})
    return sorted(n for n, c in counts.items() if c >= need)


def tune_relation(bags: Sequence[Sequence[Iterable]], share: float = START_SHARE, step: float = SHARE_STEP,
                  keep: tuple[int, int] = KEEP, min_sharing: int = MIN_SHARING,
                  max_tries: int = MAX_TRIES) -> tuple[list[list[Neuron]], float, float]:
    """The released code's relation-level tuning: ``(refined set per bag, p used, mean size)``.

    Each try refines every bag at p; a mean size below ``keep[0]`` lowers p by ``step``, above
    ``keep[1]`` raises it; the loop stops in range or after ``max_tries`` tries, and the sets
    are those of the last p tried."""
    if not bags:
        raise KnowledgeNeuronError("the relation has no facts to refine")
    lo, hi = keep
    for _ in range(max_tries):
        used = share
        sets = [bag_neurons(b, used, min_sharing) for b in bags]
        mean = sum(map(len, sets)) / len(sets)
        if mean < lo:
            share = round(share - step, 10)
        if mean > hi:
            share = round(share + step, 10)
        if lo <= mean <= hi:
            break
    return sets, used, mean


def ratio_of_means(before: Sequence[float], after: Sequence[float]) -> float | None:
    """``(mean(after) - mean(before)) / mean(before)``; None without data or with mean 0."""
    if not before:
        return None
    if len(before) != len(after):
        raise KnowledgeNeuronError("before and after need the same prompts")
    b = sum(before) / len(before)
    return None if b <= 0 else (sum(after) / len(after) - b) / b


def relation_mean(rows: Sequence[dict], before: str, after: str) -> float | None:
    """The paper's headline: per relation the ratio of means over the prompts of all its
    rows (``row[before]``/``row[after]`` are per-prompt lists, ``row["relation"]`` its
    relation), then the plain mean over relations."""
    per = per_relation(rows, before, after)
    vals = [v for v in per.values() if v is not None]
    return sum(vals) / len(vals) if vals else None


def per_relation(rows: Sequence[dict], before: str, after: str) -> dict[str, float | None]:
    grouped: dict[str, tuple[list, list]] = {}
    for r in rows:
        b, a = grouped.setdefault(r["relation"], ([], []))
        b.extend(r[before])
        a.extend(r[after])
    return {rel: ratio_of_means(b, a) for rel, (b, a) in sorted(grouped.items())}


def pooled(rows: Sequence[dict], before: str, after: str) -> float | None:
    """Ratio of means over every prompt of every row (what kn_plugin 0.1 reported)."""
    return ratio_of_means([x for r in rows for x in r[before]], [x for r in rows for x in r[after]])


def prompt_median(rows: Sequence[dict], before: str, after: str) -> float | None:
    """Median over prompts of each prompt's own relative change ``after / before - 1``."""
    vals = sorted(a / b - 1 for r in rows for b, a in zip(r[before], r[after]) if b > 0)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def update_rates(before_top: Sequence[int], after_top: Sequence[int], old_id: int, new_id: int) -> dict:
    """Change and success over the prompts whose top-1 was the old object before the edit
    (the released code skips prompts the model answers wrongly); None when there are none."""
    kept = [a for b, a in zip(before_top, after_top) if b == old_id]
    if not kept:
        return {"prompts": 0, "change": None, "success": None}
    return {"prompts": len(kept), "change": sum(a != old_id for a in kept) / len(kept),
            "success": sum(a == new_id for a in kept) / len(kept)}


def update_neurons(neurons: Iterable, bags: Sequence[Iterable], max_share: float = UPDATE_MAX_SHARE) -> list[Neuron]:
    """The released code's ``select_kn``: a fact's neurons minus those counted in more than
    ``max_share`` of the relation's bags, where the count starts at 1 for the fact's own
    neurons and adds every bag holding the neuron (the fact's own included)."""
    own = sorted({tuple(n) for n in neurons})
    held = Counter(n for b in bags for n in {tuple(x) for x in b})
    return [n for n in own if 1 + held[n] <= max_share * len(bags)]


def control_facts(candidates: Sequence[dict], exclude_key: str, new_object: str, n: int,
                  rng: random.Random) -> list[dict]:
    """Up to ``n`` distinct facts of ``candidates`` drawn with ``rng``, never the edited fact
    nor a fact whose object is the new object ``t'`` (its answer is what the edit installs)."""
    pool = [c for c in candidates if c["key"] != exclude_key and c["target"] != new_object]
    return rng.sample(pool, min(n, len(pool)))


def top_shared(sets: Sequence[Iterable], k: int = ERASE_TOP) -> list[Neuron]:
    """The ``k`` neurons in most of ``sets`` (``Counter.most_common``: ties in first-seen order)."""
    counts = Counter(tuple(n) for s in sets for n in s)
    return [n for n, _ in counts.most_common(k)]
