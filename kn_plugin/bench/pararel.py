"""``kn bench pararel``: the paper's experiments on PARAREL under its own protocol (resumable).

Follows the authors' released code (:mod:`kn_plugin.paper`) and adds what the paper lacks:
held-out paraphrases, matched random neurons, intervals and paired tests
(:mod:`kn_plugin.bench.pararel_summary`). Stages, each record written atomically and keyed by
the content of its inputs (a rerun reads what matches and computes only the rest):

1. ``facts/<key>.json``: every prompt's P(object), rank and top-1; for a fact the model knows,
   IG and activation coarse sets on ``locate_prompts`` of its prompts (drawn per fact with the
   seed; the others are held out).
2. refinement per relation (in the driver, cheap): the released code's relation-level p.
3. ``effects/<key>.json``: suppress (x0) / amplify (x2) on every prompt of the fact with its
   knowledge neurons, the activation-selected baseline and random neurons matched by layer and
   set size; ``unrelated/<key>.json``: the same neurons on an unrelated fact of another relation.
4. ``updates/<key>.json``: the update on facts the model answers, measured on those prompts.
5. ``erase/<relation>.json``: the released code's erase of the relation's 20 commonest neurons.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from kn_plugin import paper
from kn_plugin.bench.pararel_data import ParaRelConfig, content_hash
from kn_plugin.bench.pararel_tasks import (
    effect_task,
    erase_task,
    fact_task,
    refine_relations,
    unrelated_fact,
    unrelated_task,
    update_task,
)
from kn_plugin.distributed import run_tasks
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.models import LoadedModel
from kn_plugin.runs import check_run, clear_stale, content_stage


def run_pararel(model: LoadedModel, data: dict, out: str | os.PathLike, config: ParaRelConfig,
                progress: bool = True, pool=None, reverse: bool = False) -> dict:
    """Run (or resume) the protocol on ``data`` ({relation: [ParaRelFact]}, already drawn).

    ``pool``: a started :class:`~kn_plugin.distributed.RayPool`; the tasks then run on its
    workers (the same functions as here) and the driver writes the records. ``reverse``: each
    stage hands its pending work out from the last (:func:`~kn_plugin.runs.content_stage`), for
    a second process on the same folder."""
    if not data:
        raise KnowledgeNeuronError("no PARAREL relation is usable with these settings")
    out = Path(out)
    identity = model.identity()
    check_run(out, {**identity, **asdict(config)})
    clear_stale(out)
    manifest: dict[str, dict[str, str]] = {}

    def stage(task: Callable, folder: str, jobs: list[tuple[str, str, tuple]], desc: str) -> dict[str, dict]:
        """jobs: (key, content hash, payload); a record is reused when its hash matches."""
        done, manifest[folder] = content_stage(out, folder, jobs, lambda todo: run_tasks(model, task, todo, pool),
                                               desc, progress, reverse)
        return done

    rels = sorted(data)
    settings = asdict(config)
    locate_keys = ("steps", "grid", "tolerance", "batch_size", "max_rank", "min_known", "locate_prompts", "threshold",
                   "base_threshold", "seed", "engine")
    fact_settings = {k: settings[k] for k in locate_keys}
    jobs = [(f.key, content_hash(f.prompts, f.target, fact_settings), (f, config)) for rel in rels for f in data[rel]]
    done = stage(fact_task, "facts", jobs, "facts")
    facts = {rel: [done[f.key] for f in data[rel]] for rel in rels}

    refined = refine_relations(facts, config)
    sets = refined["sets"]
    located = [rec for rel in rels for rec in facts[rel] if sets.get(rec["key"], {}).get("kn")]
    jobs = [(rec["key"], content_hash(rec["input"], sets[rec["key"]], config.random_draws, config.seed),
             (rec, sets[rec["key"]], config)) for rec in located]
    stage(effect_task, "effects", jobs, "effects")
    jobs = []
    for rec in located:
        unrel = unrelated_fact(rec, facts, config.seed)
        if unrel is not None:
            kn = sets[rec["key"]]["kn"]
            jobs.append((rec["key"], content_hash(rec["input"], kn, unrel["input"]), (rec, kn, unrel)))
    stage(unrelated_task, "unrelated", jobs, "unrelated facts")

    jobs = update_jobs(model, facts, sets, config)
    stage(update_task, "updates", jobs, "updates")

    jobs = []
    for rel in [r for r in config.erase_relations if r in facts]:
        kn_sets = [sets[r["key"]]["kn"] for r in facts[rel] if sets.get(r["key"], {}).get("kn")]
        if not kn_sets:
            continue
        neurons = [list(n) for n in paper.top_shared(kn_sets, config.erase_top)]
        rng = random.Random(f"{config.seed}-{rel}-erase")
        pool_other = [r for o in rels if o != rel for r in facts[o] if r["counted"]]
        others = rng.sample(pool_other, min(config.erase_others, len(pool_other)))
        rel_facts = [r for r in facts[rel] if r["counted"]]
        content = content_hash(neurons, [r["input"] for r in rel_facts], [r["input"] for r in others])
        jobs.append((rel, content, (rel, neurons, rel_facts, others, config)))
    stage(erase_task, "erase", jobs, "erasures")
    return {"protocol": "paper", "model": model.name, "fingerprint": model.fingerprint,
            "dtype": identity["dtype"], "weights": identity["weights"], "config": settings,
            "relations": {rel: [f.key for f in data[rel]] for rel in rels}, "records": manifest,
            "refined": refined}


def update_jobs(model, facts: dict[str, list[dict]], sets: dict, config: ParaRelConfig) -> list:
    """Per relation up to ``update_facts`` edits, in a seeded order of its located facts: the
    new object is another object of the relation (another first token); facts without a
    correctly answered prompt or without neurons left after the 10% rule are passed over."""
    first = lambda t: model.tokenizer(t, add_special_tokens=False)["input_ids"][:1]  # noqa: E731
    jobs = []
    rels = sorted(facts)
    for rel in rels:
        located = [r for r in facts[rel] if sets.get(r["key"], {}).get("kn")]
        bags = [sets[r["key"]]["kn"] for r in located]
        rng = random.Random(f"{config.seed}-{rel}-update")
        order = located[:]
        rng.shuffle(order)
        objects = sorted({r["target"] for r in facts[rel]})
        n = 0
        for rec in order:
            if n >= config.update_facts:
                break
            neurons = paper.update_neurons(sets[rec["key"]]["kn"], bags)
            candidates = [o for o in objects if first(o) != first(rec["target"])]
            if not neurons or not candidates or not any(rec["top"]):
                continue
            new = rng.choice(candidates)
            intra = paper.control_facts([r for r in facts[rel] if r["counted"]], rec["key"], new, config.controls, rng)
            inter_pool = [r for o in rels if o != rel for r in facts[o] if r["counted"]]
            inter = rng.sample(inter_pool, min(config.controls, len(inter_pool)))
            content = content_hash(rec["input"], neurons, new, [r["input"] for r in intra],
                                   [r["input"] for r in inter], config.lambda1, config.lambda2)
            jobs.append((rec["key"], content, (rec, [list(x) for x in neurons], new, intra, inter, config)))
            n += 1
    return jobs
