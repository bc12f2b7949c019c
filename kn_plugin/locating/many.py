"""Many facts per call: :func:`locate_many` and its result folder (one file per fact, resumable).

Facts run one after another in this process, or as tasks on a :class:`~kn_plugin.distributed.RayPool`.
With ``out=``, each fact's :class:`~kn_plugin.locating.LocateResult` is written atomically as
soon as it is finished (``<key>.json`` + ``<key>.json.npz``), and a rerun loads finished facts
instead of computing them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from kn_plugin.data import Fact
from kn_plugin.distributed import run_tasks
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.files import clear_own_temps
from kn_plugin.locating.config import LocateConfig
from kn_plugin.locating.core import locate_with
from kn_plugin.locating.result import LOW_PROB, LocateResult, LowProbabilityWarning, RefinementNote
from kn_plugin.models import wrap
from kn_plugin.runs import check_run
from kn_plugin.validation import output_folder

logger = logging.getLogger(__name__)

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,150}$")


def _as_fact(item) -> Fact:
    if isinstance(item, Fact):
        return item
    if hasattr(item, "prompts") and hasattr(item, "target"):  # ParaRelFact and the like
        return Fact(getattr(item, "subject", ""), getattr(item, "relation", ""), item.target, tuple(item.prompts),
                    getattr(item, "key", ""))
    if isinstance(item, dict):
        prompts = item.get("prompts") or ([item["prompt"]] if "prompt" in item else None)
        if prompts is None or "target" not in item:
            raise KnowledgeNeuronError(f"a fact needs 'prompts' and 'target', got keys {sorted(item)}")
        return Fact(item.get("subject", ""), item.get("relation", ""), item["target"],
                    (prompts,) if isinstance(prompts, str) else tuple(prompts), item.get("key", ""))
    if isinstance(item, (tuple, list)) and len(item) == 2:
        prompts, target = item
        return Fact("", "", target, (prompts,) if isinstance(prompts, str) else tuple(prompts))
    raise KnowledgeNeuronError(f"cannot read a fact from {type(item).__name__}: give a Fact, a dict with "
                               "'prompts' and 'target', or a (prompts, target) pair")


def fact_key(fact: Fact, position: int) -> str:
    """The fact's own key, else its position and a hash of its prompts and target (a fact
    edited in the file gets a new key, so a rerun does not reuse a stale result)."""
    if fact.key:
        return fact.key
    digest = hashlib.sha1(json.dumps([fact.prompts, fact.target]).encode()).hexdigest()[:8]
    return f"{position:05d}-{digest}"


def keyed_facts(facts: Iterable) -> list[tuple[str, Fact]]:
    """``(key, Fact)`` for each input fact, keys checked (file-name safe, unique)."""
    out, seen = [], set()
    for i, item in enumerate(facts):
        fact = _as_fact(item)
        if not isinstance(fact.target, str) or not fact.target:
            raise KnowledgeNeuronError(f"fact {i}: the target must be a non-empty string")
        if not fact.prompts or not all(isinstance(p, str) and p.strip() for p in fact.prompts):
            raise KnowledgeNeuronError(f"fact {i}: give at least one non-empty text prompt")
        key = fact_key(fact, i)
        if not _KEY.match(key):
            raise KnowledgeNeuronError(f"fact {i}: key {key!r} is not a file name (letters, digits, '_', '.', '-')")
        if key in seen:
            raise KnowledgeNeuronError(f"fact {i}: key {key!r} appears twice")
        seen.add(key)
        out.append((key, fact))
    if not out:
        raise KnowledgeNeuronError("give at least one fact")
    return out


def check_locate_options(options: dict) -> dict:
    """Options of :func:`locate` checked before anything runs (unknown names, bad values)."""
    LocateConfig.from_options(options)
    return options


def run_signature(model, options: dict) -> dict:
    """The model and every effective locate setting (defaults filled in, method and engine by name)."""
    return {**model.identity(), **LocateConfig.from_options(options).identity()}


def locate_task(model, prompts: tuple[str, ...], target: str, config: LocateConfig) -> LocateResult:
    """One fact of :func:`locate_many` (runs in this process or in a Ray worker); low target
    probabilities are summed up once by :func:`locate_many` instead of a warning per prompt."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LowProbabilityWarning)
        warnings.simplefilter("ignore", RefinementNote)
        return locate_with(model, list(prompts), target, replace(config, progress=False))


class ResultFolder:
    """``<key>.json`` (+ ``.npz``) per fact; a file that does not load is computed again."""

    def __init__(self, out, signature: dict):
        self.root = output_folder(out, "--out folder")
        self.root.mkdir(parents=True, exist_ok=True)
        check_run(self.root, signature)  # results of other settings are not reused
        clear_own_temps(self.root)  # left by a run killed while writing (kn's own names only)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def load(self, key: str, fingerprint: str | None, prompts=None, target: str | None = None) -> LocateResult | None:
        """The finished result of ``key``; a result under that key for other prompts or
        another target is refused (a fact's key names its content, never two of them)."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            result = LocateResult.load(path)
        except KnowledgeNeuronError as exc:
            logger.warning("%s: unreadable (%s); computing it again", path, exc)
            return None
        if fingerprint is not None and result.fingerprint != fingerprint:
            raise KnowledgeNeuronError(f"{path} was made for another model ({result.model}, {result.fingerprint}): "
                                       "use another --out folder")
        texts = prompts is not None and all(isinstance(p, str) for p in prompts)  # token ids are kept as given
        if texts and (list(result.prompts) != list(prompts) or result.target != target):
            raise KnowledgeNeuronError(f"{path} holds key {key!r} for another fact ({result.target!r} after "
                                       f"{result.prompts[0]!r}): give each fact its own key, or use another --out folder")
        return result

    def save(self, key: str, result: LocateResult) -> Path:
        return result.save(self.path(key))


def locate_many(model, facts, *, out=None, pool=None, progress: bool = True, tokenizer=None,
                **options) -> Iterator[tuple[str, LocateResult]]:
    """Locate the knowledge neurons of many facts; yields ``(key, LocateResult)`` per fact.

    ``facts``: :class:`~kn_plugin.data.Fact` objects (their ``key`` names the result), PARAREL
    facts, dicts with ``prompts``/``target`` (optional ``key``), or ``(prompts, target)``
    pairs. Without a key a fact is named by its position and a hash of its text.
    ``options``: those of :func:`locate` (``steps``, ``threshold``, ``share``, ``method``,
    ``engine``, ``grid``, ...), checked before anything runs.
    ``out``: a folder; each result is written there as it finishes and a rerun skips finished
    facts (they are loaded and yielded first). ``pool``: a started
    :class:`~kn_plugin.distributed.RayPool`; results then come in the order they finish.
    Without a pool the order is the input order. ``progress``: a bar with facts/s and ETA.
    """
    loaded = wrap(model, tokenizer=tokenizer)
    items = keyed_facts(facts)
    config = LocateConfig.from_options(options)
    folder = ResultFolder(out, {**loaded.identity(), **config.identity()}) if out is not None else None

    def generate():
        todo, low = [], []

        def finished(key, result, computed: bool):
            if computed and folder is not None:
                folder.save(key, result)
            if min(result.target_prob, default=1.0) < LOW_PROB:
                low.append(key)
            bar.update(1)
            return key, result

        with tqdm(total=len(items), desc="facts", unit="fact", disable=not progress) as bar:
            for key, fact in items:
                payload = (fact.prompts, fact.target, config)
                done = folder.load(key, loaded.fingerprint, fact.prompts, fact.target) if folder is not None else None
                if done is not None:
                    yield finished(key, done, False)
                elif pool is None:  # in order, one at a time
                    (_, result), = run_tasks(loaded, locate_task, [(key, payload)])
                    yield finished(key, result, True)
                else:
                    todo.append((key, payload))
            for key, result in run_tasks(loaded, locate_task, todo, pool):
                yield finished(key, result, True)
        if low:
            warnings.warn(f"{len(low)} of {len(items)} facts have a prompt with P(target) < {LOW_PROB:g} "
                          f"(e.g. {low[0]}): the model does not predict them, so their neurons say little "
                          "about them", LowProbabilityWarning, stacklevel=2)

    return generate()
